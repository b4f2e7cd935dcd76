"""Public layers, one per file."""

from vislearn.layers.gradient_reversal import GradientReversal

__all__ = ["GradientReversal"]
