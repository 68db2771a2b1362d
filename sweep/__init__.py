"""The sweep process: Optuna, MLflow and the trial processes. It never imports torch."""
