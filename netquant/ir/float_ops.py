"""The functions of the op kind "float" (netquant/ir/ops.py): ops netquant keeps in floating
point, by name, so a graph that holds them can be saved.

Each entry maps a name to ``fn(x, **kwargs)`` on a float tensor (or ``fn(a, b)`` for "mul"), the
reason it stays float, which the quantization report prints next to the layer, and whether it is
elementwise: its output element depends on the same input element only, so code generation can
replace a chain of such ops on an 8-bit tensor by a table of 256 values (program.lut_table).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


class FloatFn(NamedTuple):
    fn: Callable
    reason: str
    elementwise: bool = False


FLOAT_FNS: dict[str, FloatFn] = {
    "softmax": FloatFn(lambda x, dim=1: torch.softmax(x, dim), "softmax is evaluated in float on the dequantized scores"),
    "log_softmax": FloatFn(lambda x, dim=1: torch.log_softmax(x, dim), "log-softmax is evaluated in float"),
    "sigmoid": FloatFn(lambda x: torch.sigmoid(x), "sigmoid has no int8 kernel (needs a lookup table)", True),
    "tanh": FloatFn(lambda x: torch.tanh(x), "tanh has no int8 kernel (needs a lookup table)", True),
    "gelu": FloatFn(lambda x: F.gelu(x), "GELU has no int8 kernel", True),
    "silu": FloatFn(lambda x: F.silu(x), "SiLU has no int8 kernel", True),
    "hardswish": FloatFn(lambda x: F.hardswish(x), "hard-swish has no int8 kernel", True),
    "hardsigmoid": FloatFn(lambda x: F.hardsigmoid(x), "hard-sigmoid has no int8 kernel", True),
    "leaky_relu": FloatFn(lambda x, negative_slope=0.01: F.leaky_relu(x, negative_slope),
                          "leaky ReLU has no int8 kernel", True),
    "elu": FloatFn(lambda x, alpha=1.0: F.elu(x, alpha), "ELU has no int8 kernel", True),
    "exp": FloatFn(lambda x: torch.exp(x), "exp has no int8 kernel", True),
    "mul": FloatFn(lambda a, b: a * b, "elementwise product of two activations has no int8 kernel"),
    # size: the output (H, W); mode "bilinear" (nearest is captured as an exact gather)
    "interpolate": FloatFn(lambda x, size, mode="bilinear", align_corners=False:
                           F.interpolate(x, size=tuple(size), mode=mode, align_corners=align_corners),
                           "bilinear resampling has no int8 kernel"),
}

ELEMENTWISE_FNS = tuple(k for k, f in FLOAT_FNS.items() if f.elementwise)


def float_op(name: str):
    """The float function registered as ``name``."""
    try:
        return FLOAT_FNS[name].fn
    except KeyError:
        raise ValueError(f"unknown float op {name!r}; known: {', '.join(FLOAT_FNS)}") from None


def float_reason(name: str) -> str:
    return FLOAT_FNS[name].reason
