"""Methods, one per file."""

from vislearn.models.dann import DANN

__all__ = ["DANN"]
