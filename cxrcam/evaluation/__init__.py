"""Evaluation: classification and detection metrics."""
