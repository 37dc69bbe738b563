"""What a model expects as input, declared once: shape, channel order, pixel range, mean and std.

netquant always hands a network RGB images in [0, 1] (uint8 images are divided by 255), NCHW.
A model trained on other input (BGR, pixels in 0..255, z-score normalised) declares it with an
:class:`InputSpec`; :func:`apply_input_spec` then puts the conversion into the graph itself, as
float nodes right after the input, so calibration, every executor, code generation and the ONNX
export all see it, and the model's own layer names stay as they are (no wrapper module).

The model's input channel c (in the model's order) is

    y[c] = (lo + (hi - lo) * x[p(c)] - mean[c]) / std[c]

with (lo, hi) = ``value_range``, x the netquant image and p(c) the RGB channel the model's channel
c reads (p = (2, 1, 0) for BGR, the identity for RGB). Worked example, the ImageNet z-score on
0..255 pixels: value_range (0, 255), mean[0] = 123.675, std[0] = 58.395; a red value of 0.5
becomes (0 + 255 * 0.5 - 123.675) / 58.395 = 0.0655.

In the graph this is one ``affine`` on the netquant channels (scale (hi - lo) / std[c], shift
(lo - mean[c]) / std[c], with c the model channel that reads it), then, for BGR, one ``gather``
that reorders the channels. The affine comes first so that it reads the network input directly
(where code generation runs it in float), and the reorder is exact integer data movement after
the input is quantized.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from ..errors import ArgumentError
from .graph import Graph, Node, rename_inputs

CHANNEL_ORDERS = ("RGB", "BGR")
AFFINE_NAME = "input_spec"         # the node of the scaling and normalisation
REORDER_NAME = "input_spec_bgr"    # the node of the channel reorder


def _floats(name: str, v, length: Optional[int] = None) -> tuple:
    try:
        out = tuple(float(x) for x in (v if isinstance(v, (tuple, list, np.ndarray)) else [v]))
    except (TypeError, ValueError):
        raise ArgumentError(f"input_spec.{name}: expected numbers, got {v!r}") from None
    if length is not None and len(out) != length:
        raise ArgumentError(f"input_spec.{name}: expected {length} values (one per input channel), got {len(out)}: {v!r}")
    if not all(math.isfinite(x) for x in out):
        raise ArgumentError(f"input_spec.{name}: expected finite numbers, got {v!r}")
    return out


@dataclass(frozen=True)
class InputSpec:
    """The input a model expects; netquant images (RGB, [0, 1]) are converted to it in the graph."""

    shape: tuple                               # (C, H, W) of one image, e.g. (3, 224, 224)
    channel_order: str = "RGB"                 # the model's channel order: "RGB" or "BGR"
    value_range: tuple = (0.0, 1.0)            # pixel range before mean/std: (0, 1), (0, 255), (-1, 1)...
    mean: Optional[tuple] = None               # per channel, in the model's order (None: 0)
    std: Optional[tuple] = None                # per channel, in the model's order (None: 1)

    def __post_init__(self):
        shape = self.shape
        if (not isinstance(shape, (tuple, list)) or len(shape) != 3
                or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise ArgumentError(f"input_spec.shape: expected (C, H, W), three positive integers, got {shape!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))
        c = self.shape[0]
        if self.channel_order not in CHANNEL_ORDERS:
            raise ArgumentError(f"input_spec.channel_order: expected one of {CHANNEL_ORDERS}, got {self.channel_order!r}")
        if self.channel_order == "BGR" and c != 3:
            raise ArgumentError(f"input_spec.channel_order: 'BGR' needs 3 input channels, shape {self.shape} has {c}")
        lo, hi = _floats("value_range", self.value_range, 2)
        if not lo < hi:
            raise ArgumentError(f"input_spec.value_range: expected (low, high) with low < high, got {self.value_range!r}")
        object.__setattr__(self, "value_range", (lo, hi))
        if self.mean is not None:
            object.__setattr__(self, "mean", _floats("mean", self.mean, c))
        if self.std is not None:
            std = _floats("std", self.std, c)
            if not all(s > 0 for s in std):
                raise ArgumentError(f"input_spec.std: every value must be > 0, got {std}")
            object.__setattr__(self, "std", std)

    @property
    def is_identity(self) -> bool:
        """True when the model takes netquant's images as they are (RGB in [0, 1], no mean/std)."""
        return (self.channel_order == "RGB" and self.value_range == (0.0, 1.0)
                and self.mean is None and self.std is None)

    def permutation(self) -> np.ndarray:
        """p: the model's channel c reads netquant channel p[c]."""
        c = self.shape[0]
        return np.arange(c)[::-1].copy() if self.channel_order == "BGR" else np.arange(c)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift) per netquant channel c' (float64): z[c'] = scale[c'] * x[c'] + shift[c'],
        so that the model's channel c is z[p[c]]."""
        c = self.shape[0]
        lo, hi = self.value_range
        mean = np.asarray(self.mean if self.mean is not None else [0.0] * c, np.float64)
        std = np.asarray(self.std if self.std is not None else [1.0] * c, np.float64)
        p = self.permutation()
        scale, shift = np.empty(c), np.empty(c)
        scale[p] = (hi - lo) / std          # netquant channel p[c] feeds model channel c
        shift[p] = (lo - mean) / std
        return scale, shift

    def apply(self, x):
        """Netquant images (N, C, H, W) float in [0, 1] -> what the model takes (a torch tensor or a
        numpy array, the same kind back); the reference for what the graph nodes compute."""
        scale, shift = self.affine()
        view = (1, -1, 1, 1)
        if isinstance(x, np.ndarray):
            z = x * scale.astype(np.float32).reshape(view) + shift.astype(np.float32).reshape(view)
            return z[:, self.permutation()].astype(np.float32)
        import torch

        s = torch.from_numpy(scale.astype(np.float32)).view(view)
        t = torch.from_numpy(shift.astype(np.float32)).view(view)
        return (x * s + t)[:, torch.from_numpy(self.permutation())]

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict) -> "InputSpec":
        if not isinstance(d, dict):
            raise ArgumentError(f"input_spec: expected a JSON object, got {type(d).__name__}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ArgumentError(f"input_spec: unknown fields {sorted(unknown)}; known: {list(cls.__dataclass_fields__)}")
        if "shape" not in d:
            raise ArgumentError("input_spec: the field 'shape' is missing")
        args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**args)

    def __repr__(self) -> str:
        parts = [f"shape={self.shape}", self.channel_order, f"range={self.value_range}"]
        if self.mean is not None:
            parts.append(f"mean={tuple(round(m, 4) for m in self.mean)}")
        if self.std is not None:
            parts.append(f"std={tuple(round(s, 4) for s in self.std)}")
        return f"InputSpec({', '.join(parts)})"


def _unique(graph: Graph, name: str) -> str:
    taken = set(graph.names())
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    return out


def apply_input_spec(graph: Graph, spec: Optional[InputSpec]) -> Graph:
    """``graph`` (which takes what the model takes) with ``spec``'s conversion put after its input,
    so the new graph takes netquant images (RGB in [0, 1]). See the module docstring for the math.

    A leading per-channel affine of the model itself (its own normalisation or batch norm) merges
    into the spec's affine, so the input still has one float affine. None, or a spec that changes
    nothing, returns ``graph`` unchanged.
    """
    if spec is None:
        return graph
    if not isinstance(spec, InputSpec):
        raise ArgumentError(f"input_spec: expected an InputSpec, got {type(spec).__name__}")
    inp = graph.input
    if tuple(inp.shape) != spec.shape:
        raise ArgumentError(f"input_spec.shape {spec.shape} does not match the network input {tuple(inp.shape)} "
                            f"({graph.source or 'graph'})")
    if spec.is_identity:
        return graph
    scale, shift = spec.affine()
    p = spec.permutation()
    reorder = not np.array_equal(p, np.arange(len(p)))
    users = graph.consumers(inp.name)
    first = users[0] if len(users) == 1 else None
    name, layers, drop = _unique(graph, AFFINE_NAME), None, set()
    if first is not None and first.op == "affine" and first.params["scale"].shape == (len(p),):
        # the model's own normalisation y[c] = s[c] * z[p[c]] + t[c], merged per netquant channel;
        # the merged node keeps the model's name and layers
        s, t = first.params["scale"].astype(np.float64), first.params["shift"].astype(np.float64)
        scale, shift = scale.copy(), shift.copy()
        scale[p], shift[p] = scale[p] * s, shift[p] * s + t
        name, layers, drop = first.name, first.layers, {first.name}
    affine = Node(name, "affine", (inp.name,), inp.shape, {},
                  {"scale": scale.astype(np.float32), "shift": shift.astype(np.float32)}, layers or (name,))
    new = [inp, affine]
    last = affine.name
    if reorder:
        c, h, w = spec.shape
        # 1-based gather index: output element (c, h, w) reads input element (p[c], h, w)
        index = (p[:, None] * (h * w) + np.arange(h * w)[None, :]).reshape(-1).astype(np.int64) + 1
        gname = _unique(graph, REORDER_NAME)
        new.append(Node(gname, "gather", (affine.name,), inp.shape, {}, {"index": index}, (gname,)))
        last = gname
    rest = [n for n in graph.nodes if n.op != "input" and n.name not in drop]
    mapping = {inp.name: last, **{d: last for d in drop}}
    rest = rename_inputs(rest, mapping)
    output = mapping.get(graph.output, graph.output)
    return Graph(tuple(new + rest), output, graph.source)
