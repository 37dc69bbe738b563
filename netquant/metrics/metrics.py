"""Metric functions for validation.

A metric is any callable ``metric(scores, labels) -> float`` where ``scores`` is a float32
array (N, classes) of the network's outputs and ``labels`` an int64 array (N,) of true classes.
Its ``__name__`` labels the result table. MATLAB's ``hComputeAccuracy`` is, in full::

    def accuracy(scores, labels):
        return float((scores.argmax(1) == labels).mean())

Custom metrics are passed as callables from the API, or as importable ``module:function`` names
from the CLI and the app (never as code typed into a box), or as ``file.py:function``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import MetricError


def top1(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent: the highest score is the true class."""
    return 100.0 * float((np.asarray(scores).argmax(1) == labels).mean())


def top5(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-5 accuracy in percent: the true class is among the five highest scores."""
    best = np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :5]
    return 100.0 * float((best == np.asarray(labels)[:, None]).any(1).mean())


METRICS: dict[str, Callable] = {"top1": top1, "top5": top5}


def resolve_metric(m) -> Callable:
    """A metric from a callable, a built-in name ("top1", "top5"), "module:function" (an
    importable module, or one in the working directory) or "path/to/file.py:function" (a file of
    the user's, loaded as a module). Every failure is a :class:`~netquant.errors.MetricError`."""
    if callable(m):
        return m
    if not isinstance(m, str):
        raise MetricError(f"metric must be a callable or a name, got {m!r}")
    if m in METRICS:
        return METRICS[m]
    source, sep, name = m.rpartition(":")
    if not sep or not source or not name.isidentifier():
        raise MetricError(f"unknown metric {m!r}: use {', '.join(METRICS)}, an importable 'module:function' or "
                          f"'file.py:function'")
    if source.endswith(".py"):
        module = _load_file(source, m)
    else:
        module = _import(source, m)
    fn = getattr(module, name, None)
    if fn is None:
        raise MetricError(f"metric {m!r}: {source} has no {name!r}")
    if not callable(fn):
        raise MetricError(f"metric {m!r} is not callable")
    return fn


def _import(module: str, m: str):
    """Import ``module``, also from the working directory (where a user's metrics.py usually is)."""
    try:
        return importlib.import_module(module)
    except ImportError as first:
        cwd = os.getcwd()
        if cwd in sys.path:
            raise MetricError(f"metric {m!r}: cannot import {module} ({first})") from first
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(module)
        except ImportError as e:
            raise MetricError(f"metric {m!r}: cannot import {module}, also not from {cwd} ({e})") from e
        except Exception as e:   # the user's module failed while importing
            raise MetricError(f"metric {m!r}: importing {module} failed ({type(e).__name__}: {e})") from e
        finally:
            sys.path.remove(cwd)
    except Exception as e:
        raise MetricError(f"metric {m!r}: importing {module} failed ({type(e).__name__}: {e})") from e


def _load_file(path: str, m: str):
    """The Python file ``path`` (the user's own code, named on their command line) as a module."""
    p = Path(path)
    if not p.is_file():
        raise MetricError(f"metric {m!r}: {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"netquant_metric_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise MetricError(f"metric {m!r}: loading {path} failed ({type(e).__name__}: {e})") from e
    return module
