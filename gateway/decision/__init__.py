"""The decision plane: learning outside execution, above the state layer.

versions.py  plan versions and their lineage (recorded at compile, read for the list)
planfile.py  a plan as data and as YAML: from its stored source, or rebuilt from an Assembly
diff.py      the semantic diff of two Assemblies
observe.py   what a plan's sessions did, read from their journals
suggest.py   a revised plan, every change with its evidence
evaluate.py  a candidate plan run against recorded sessions: PEP, steps, prices, no provider
rerun.py     `--live`: what the candidate allows run again on its models, within a cap,
             its answers beside the recorded ones

Nothing here changes a running session or a stored Assembly: it reads journals, sessions
and Assemblies, and writes only version records and reports meant for a person. A live
evaluation adds its own sessions (labelled, journaled) on the candidate's Assembly, which it
stores as any session's Assembly is stored, without making it a version.
"""
