"""Checks of a dataset: before training (trainer.audit.check) and of its labels (trainer.audit.label_errors)."""
