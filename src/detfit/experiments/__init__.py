"""Experiments as practitioners run them: ``detfit tune`` (an Optuna study over any settings,
each trial a run folder) and ``detfit runs`` (run folders side by side). MLflow tracking is a
training logger: :mod:`detfit.engine.mlflow_logger`."""
