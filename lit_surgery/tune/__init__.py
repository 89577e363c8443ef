"""Optuna studies of the surgery's own settings: sweep files and the study runner."""
