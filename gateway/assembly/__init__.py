"""Plans (admin input) compile into frozen, content-addressed Assemblies."""
