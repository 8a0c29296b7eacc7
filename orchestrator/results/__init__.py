"""Reading a sweep's results back: its MLflow runs (runs), promotion in the model registry (registry), the
champion on production data (production logs what production_metrics and drift compute, production_tables
formats), and the report package that rebuilds the study's tables."""
