"""Reading a sweep's results back from MLflow: its runs, the model registry (promotion), the
champion's evaluation on production data, and the report that rebuilds the study's tables."""
