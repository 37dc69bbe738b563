"""Accuracy tools beyond rounding to nearest: per-layer sensitivity analysis, cross-layer
equalisation, empirical bias correction and AdaRound (docs/NUMERICS.md, "Accuracy tools").

The last three are flags of :class:`~netquant.quant.config.QuantConfig` (``cle``,
``bias_correction``, ``adaround``) that :func:`calibrate_graph` applies while calibrating:

1. CLE rescales conv pairs in the float graph (the float output is unchanged), before the
   statistics are collected, since it changes the ranges of the tensors between the pairs;
2. AdaRound learns each layer's integer weights on the images, in graph order;
3. bias correction then shifts each layer's bias by its mean output error.

The results live in the float graph (rescaled weights; node parameters ``adaround_weight``,
``adaround_scale``, ``bias_correction``), so a saved quantizer file keeps them with no format
change and lowering turns them into ordinary integer weights and biases.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from ..calib.calibrate import calibrate, check_images, graph_fingerprint
from ..calib.stats import RangeTable
from ..errors import StateError
from ..ir.graph import Graph
from ..progress import Progress
from ..quant.config import QuantConfig


def strip_adjustments(graph: Graph) -> Graph:
    """``graph`` without AdaRound weights and bias corrections (CLE cannot be undone, and need
    not be: the float network is the same)."""
    from . import adaround, bias_correction

    return bias_correction.strip(adaround.strip(graph))


def calibrate_graph(graph: Graph, images, config: QuantConfig, user_float: frozenset = frozenset(),
                    batch_size: int = 100, progress: Optional[Progress] = None,
                    source: str = "") -> tuple[Graph, RangeTable]:
    """(graph, statistics) for ``config``: ``graph`` calibrated on ``images`` (float32 NCHW) with
    CLE, AdaRound and bias correction applied as the config asks (see the module docstring)."""
    images = check_images(images, graph.input.shape, f"calibration images ({source or 'array'})")
    graph = strip_adjustments(graph)
    if config.cle:
        from .equalize import equalize

        graph = equalize(graph)
    ranges = calibrate(graph, images, batch_size, progress, source)
    if config.adaround:
        from .adaround import adaround

        graph = adaround(graph, ranges, config, images, user_float, progress)
    if config.bias_correction:
        from .bias_correction import correct_biases

        graph = correct_biases(graph, ranges, config, images, user_float)
    if config.adaround or config.bias_correction:
        # the statistics are those of the same float network; the fingerprint covers the new parameters
        ranges = replace(ranges, fingerprint=graph_fingerprint(graph))
    return graph, ranges


def applied(config: QuantConfig) -> dict:
    """What :func:`calibrate_graph` applied for ``config`` (recorded in the quantizer's provenance)."""
    return {"cle": config.cle, "bias_correction": config.bias_correction, "adaround": config.adaround,
            "adaround_iterations": config.adaround_iterations if config.adaround else None}


def check_applied(config: QuantConfig, provenance: dict) -> None:
    """A clear error when ``config`` asks for a technique the calibration did not apply (the
    config was changed after calibrating)."""
    done = provenance.get("accuracy", {})
    missing = [k for k in ("cle", "bias_correction", "adaround") if getattr(config, k) and not done.get(k)]
    if missing:
        raise StateError(f"config asks for {', '.join(missing)}, which calibration applies: calibrate again with "
                         f"this config (the statistics were collected without it)")
