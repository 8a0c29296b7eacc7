"""Sweep level: a YAML spec, its plan of unique trials, the ledger and executor; registry, production, report, CLI."""
