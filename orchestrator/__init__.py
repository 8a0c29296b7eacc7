"""The sweep level: the command line (__main__, verbs, render), running a sweep (sweep/: spec, plan, ledger,
executor, runner) and reading its results back from MLflow (results/: runs, registry, production, drift, report)."""
