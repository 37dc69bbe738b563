"""Calibration: run the float graph over images and collect :class:`RangeStats` of every tensor.

Weights and biases are read from the graph (after batch-norm folding, so they are the values
that get quantized); activations are observed batch by batch through the float executor.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Optional

import numpy as np
import torch

from ..errors import InputError
from ..ir.float_exec import run_float
from ..ir.graph import WEIGHTED_OPS, Graph
from ..progress import Progress, report
from .stats import RangeStats, RangeTable

log = logging.getLogger(__name__)


def graph_fingerprint(graph: Graph) -> str:
    """A hash of the graph's structure and parameters: a calibration or quantizer file records
    it so it is never applied to another network."""
    h = hashlib.sha256()
    for n in graph.nodes:
        h.update(json.dumps([n.name, n.op, list(n.inputs), list(n.shape)], default=str).encode())
        for k in sorted(n.params):
            h.update(k.encode())
            h.update(np.ascontiguousarray(n.params[k]).tobytes())
    return h.hexdigest()[:16]


def check_images(images: np.ndarray, shape: tuple, what: str = "images") -> np.ndarray:
    """Validate a batch of images for ``graph``'s input; returns float32 in the network's range.

    uint8 images are scaled to [0, 1]; float images are taken as they are.
    """
    images = np.asarray(images)
    if images.ndim != len(shape) + 1 or tuple(images.shape[1:]) != tuple(shape):
        raise InputError(f"{what}: expected shape (N, {', '.join(map(str, shape))}), got {images.shape}")
    if len(images) == 0:
        raise InputError(f"{what}: no images (an empty set)")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255)
    if not np.issubdtype(images.dtype, np.floating):
        raise InputError(f"{what}: expected uint8 or float images, got dtype {images.dtype}")
    images = images.astype(np.float32, copy=False)
    if not np.isfinite(images).all():
        bad = int((~np.isfinite(images)).reshape(len(images), -1).any(1).sum())
        raise InputError(f"{what}: {bad} image(s) hold NaN or inf values")
    return images


def weight_stats(graph: Graph) -> dict:
    out = {}
    for n in graph.nodes:
        if n.op in WEIGHTED_OPS:
            w, b = n.params["weight"], n.params["bias"]
            layer = n.layers[0]
            out[f"{n.name}_Weights"] = RangeStats("Weights", n.name, layer).update(w, channel_axis=0)
            out[f"{n.name}_Bias"] = RangeStats("Bias", n.name, layer).update(b, channel_axis=0)
    return out


def calibrate(graph: Graph, images: np.ndarray, batch_size: int = 100, progress: Optional[Progress] = None,
              source: str = "") -> RangeTable:
    """Statistics of every weight, bias and activation of ``graph`` over ``images``."""
    x = check_images(images, graph.input.shape, f"calibration images ({source or 'array'})")
    acts = {n.name: RangeStats("Activations", n.name, n.output_layer) for n in graph.nodes}

    def visit(node, value):
        acts[node.name] = acts[node.name].update(value.numpy(), channel_axis=1 if value.dim() > 1 else None)

    for start in range(0, len(x), batch_size):
        run_float(graph, torch.from_numpy(x[start:start + batch_size]), keep=(), visit=visit)
        report(progress, min(start + batch_size, len(x)), len(x), "calibrating")
    ws = weight_stats(graph)
    ordered = {}
    for n in graph.nodes:  # graph order: a layer's weights, its bias, then its output
        for k in (f"{n.name}_Weights", f"{n.name}_Bias"):
            if k in ws:
                ordered[k] = ws[k]
        ordered[n.name] = acts[n.name]
    log.info("calibrated %d tensors on %d images", len(ordered), len(x))
    return RangeTable(ordered, len(x), source, graph_fingerprint(graph))
