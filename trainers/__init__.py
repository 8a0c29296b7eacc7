"""One facial-expression-recognition trial: config, data, model, training loop, metrics, MLflow logging."""
