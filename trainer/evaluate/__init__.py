"""Evaluation: TTA, temperature calibration, metrics, scoring a run's predictions and Kaggle-style submissions."""
