"""The decision plane: learning outside execution, above the state layer.

versions.py  plan versions and their lineage (recorded at compile, read for the list)
planfile.py  a plan as data and as YAML: from its stored source, or rebuilt from an Assembly
diff.py      the semantic diff of two Assemblies
observe.py   what a plan's sessions did, read from their journals
suggest.py   a revised plan, every change with its evidence
evaluate.py  a candidate plan run against recorded sessions: PEP, steps, prices, no provider

Nothing here changes a running session or a stored Assembly: it reads journals, sessions
and Assemblies, and writes only version records and reports meant for a person.
"""
