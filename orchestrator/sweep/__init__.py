"""Running a sweep: the spec read and checked, its plan, the Optuna ledger, the executor that hands
trials to trainer processes, the pre-flight checks and the live progress display."""
