"""The study's tables and figures for one sweep, rebuilt from MLflow alone (report.md, its CSVs and figures).

store (the only module here that reads MLflow) -> cells (runs matched to grid points by config_hash)
-> groups and champion (the sections), with references (the study's numbers) and tables (formatting),
put together by document.write_report.
"""
from orchestrator.results.report.document import write_report

__all__ = ["write_report"]
