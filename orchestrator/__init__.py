"""The sweep level: the command line (__main__, verbs, render), running a sweep (sweep/: spec, plan, ledger,
executor) and reading its results back from MLflow (results/: registry, production, report)."""
