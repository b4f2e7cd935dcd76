"""Evaluation: classification/domain metrics, plots (more protocols per method family)."""
