"""Ops netquant keeps in floating point, by name, so a graph that holds them can be saved.

Each entry maps a name to ``f(x, **kwargs)`` on a float tensor (or ``f(a, b)`` for "mul"), and
to the reason it stays float, which the quantization report prints next to the layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FLOAT_OPS = {
    "softmax": (lambda x, dim=1: torch.softmax(x, dim), "softmax is evaluated in float on the dequantized scores"),
    "log_softmax": (lambda x, dim=1: torch.log_softmax(x, dim), "log-softmax is evaluated in float"),
    "sigmoid": (lambda x: torch.sigmoid(x), "sigmoid has no int8 kernel (needs a lookup table)"),
    "tanh": (lambda x: torch.tanh(x), "tanh has no int8 kernel (needs a lookup table)"),
    "gelu": (lambda x: F.gelu(x), "GELU has no int8 kernel"),
    "silu": (lambda x: F.silu(x), "SiLU has no int8 kernel"),
    "hardswish": (lambda x: F.hardswish(x), "hard-swish has no int8 kernel"),
    "hardsigmoid": (lambda x: F.hardsigmoid(x), "hard-sigmoid has no int8 kernel"),
    "leaky_relu": (lambda x, negative_slope=0.01: F.leaky_relu(x, negative_slope), "leaky ReLU has no int8 kernel"),
    "elu": (lambda x, alpha=1.0: F.elu(x, alpha), "ELU has no int8 kernel"),
    "exp": (lambda x: torch.exp(x), "exp has no int8 kernel"),
    "mul": (lambda a, b: a * b, "elementwise product of two activations has no int8 kernel"),
    # size: the output (H, W); mode "bilinear" (nearest is captured as an exact gather)
    "interpolate": (lambda x, size, mode="bilinear", align_corners=False:
                    F.interpolate(x, size=tuple(size), mode=mode, align_corners=align_corners),
                    "bilinear resampling has no int8 kernel"),
}


def float_op(name: str):
    """The float function registered as ``name``."""
    try:
        return FLOAT_OPS[name][0]
    except KeyError:
        raise ValueError(f"unknown float op {name!r}; known: {', '.join(FLOAT_OPS)}") from None


def float_reason(name: str) -> str:
    return FLOAT_OPS[name][1]
