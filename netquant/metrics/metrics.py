"""Metric functions for validation.

A metric is any callable ``metric(scores, labels) -> float`` where ``scores`` is a float32
array (N, classes) of the network's outputs and ``labels`` an int64 array (N,) of true classes.
Its ``__name__`` labels the result table. MATLAB's ``hComputeAccuracy`` is, in full::

    def accuracy(scores, labels):
        return float((scores.argmax(1) == labels).mean())

Custom metrics are passed as callables from the API, or as importable ``module:function`` names
from the CLI and the app (never as code typed into a box).
"""
from __future__ import annotations

import importlib
from typing import Callable

import numpy as np


def top1(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent: the highest score is the true class."""
    return 100.0 * float((np.asarray(scores).argmax(1) == labels).mean())


def top5(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-5 accuracy in percent: the true class is among the five highest scores."""
    best = np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :5]
    return 100.0 * float((best == np.asarray(labels)[:, None]).any(1).mean())


METRICS: dict[str, Callable] = {"top1": top1, "top5": top5}


def resolve_metric(m) -> Callable:
    """A metric from a callable, a built-in name ("top1", "top5") or "module:function"."""
    if callable(m):
        return m
    if not isinstance(m, str):
        raise ValueError(f"metric must be a callable or a name, got {m!r}")
    if m in METRICS:
        return METRICS[m]
    if ":" not in m:
        raise ValueError(f"unknown metric {m!r}: use {', '.join(METRICS)} or an importable 'module:function'")
    module, _, name = m.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"metric {m!r}: cannot import {name} from {module} ({e})") from e
    if not callable(fn):
        raise ValueError(f"metric {m!r} is not callable")
    return fn
