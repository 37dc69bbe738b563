"""Metrics on class scores and comparisons between the float and the int8 network."""
from .metrics import METRICS, resolve_metric, top1, top5
from .compare import agreement, paired_bootstrap, mcnemar, sqnr_db

__all__ = ["METRICS", "resolve_metric", "top1", "top5", "agreement", "paired_bootstrap", "mcnemar", "sqnr_db"]
