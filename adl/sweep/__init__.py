"""Hyperparameter sweeps over a cache: the space, the Optuna study, grouped training, workers, reports."""
