"""Optuna studies of the surgery's own settings: sweep files, the study, its storage and
its results."""
