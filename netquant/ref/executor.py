"""The integer reference executor: the executable form of docs/NUMERICS.md.

Runs a :class:`~netquant.quant.qgraph.QGraph` on a float batch. Integer tensors are int32 torch
tensors holding int8/uint8 values; there is no floating point inside the integer part except
float32 matrix products of integers whose exactness is proven by the k_chunks bound (every
partial sum below 2^24 in magnitude), whose results are converted to int64 before anything else.
Float nodes (input normalisation, softmax, layers kept float) run in float32.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..ir.float_exec import FLOAT_KERNELS
from ..ir.interpret import interpret, registrar
from ..quant import numerics as nx
from ..quant.qgraph import QGraph, QNode

INT_KERNELS: dict[str, Callable] = {}
kernel = registrar(INT_KERNELS)


def _per_channel(a: np.ndarray, rank: int) -> torch.Tensor:
    """(C,) int array -> int64 tensor shaped to broadcast along the channel axis of a rank-``rank``
    NC... tensor: (C, 1, 1) for NCHW, (C,) for NC."""
    return torch.from_numpy(a.astype(np.int64)).view(-1, *([1] * (rank - 2)))


def exact_matmul(w: torch.Tensor, cols: torch.Tensor, chunks) -> torch.Tensor:
    """sum_k w[..., o, k] * cols[..., k, l] as int64, from float32 products over the K chunks
    (each chunk's partial sums are integers below 2^24, hence exact in float32)."""
    acc = None
    for k0, k1 in chunks:
        part = torch.matmul(w[..., k0:k1], cols[..., k0:k1, :]).to(torch.int64)
        acc = part if acc is None else acc + part
    return acc


_F32_WEIGHTS: dict = {}  # id(int8 weight array) -> its float32 copy (exact), freed with the array


def _weights_f32(w: np.ndarray, shape: tuple) -> torch.Tensor:
    """A float32 copy of int8 weights, made once per weight array (a cache of derived data; the
    QNode itself is never modified)."""
    key = (id(w), shape)
    t = _F32_WEIGHTS.get(key)
    if t is None:
        t = _F32_WEIGHTS[key] = torch.from_numpy(w.astype(np.float32).reshape(shape))
        weakref.finalize(w, _F32_WEIGHTS.pop, key, None)
    return t


def _weights(n: QNode) -> torch.Tensor:
    """Weights as (G, O/G, K/G) float32, for the matrix products of linear layers."""
    g = n.attrs.get("groups", 1)
    w = n.params["weight"]
    return _weights_f32(w, (g, len(w) // g, -1))


@kernel("conv")
def _conv(n: QNode, x: torch.Tensor) -> torch.Tensor:
    a = n.attrs
    w = _conv_weights(n)
    xf = x.to(torch.float32)
    # k_chunks of a conv split whole input channels (see lower.k_chunks): each chunk is a conv
    # over a channel slice whose partial sums stay below 2^24, so float32 is exact, in any order
    # of summation (oneDNN's direct algorithm; the executor pins fp32 precision to IEEE)
    acc = None
    unit = w.shape[2] * w.shape[3]
    for k0, k1 in a["k_chunks"]:
        c0, c1 = k0 // unit, k1 // unit
        if a["groups"] == 1:
            part = F.conv2d(xf[:, c0:c1], w[:, c0:c1], None, a["stride"], a["padding"], a["dilation"])
        else:  # one chunk spans every group (lower.k_chunks guarantees it)
            part = F.conv2d(xf, w, None, a["stride"], a["padding"], a["dilation"], a["groups"])
        part = part.to(torch.int64)
        acc = part if acc is None else acc + part
    acc = acc + _per_channel(n.params["bias"], 4)                                               # (N, O, H, W)
    return nx.requantize(acc, _per_channel(n.params["multiplier"], 4), _per_channel(n.params["shift"], 4), *a["clamp"])


def _conv_weights(n: QNode) -> torch.Tensor:
    w = n.params["weight"]
    return _weights_f32(w, w.shape)


@kernel("linear")
def _linear(n: QNode, x: torch.Tensor) -> torch.Tensor:
    cols = x.reshape(len(x), -1, 1).to(torch.float32)          # (N, K, 1)
    acc = exact_matmul(_weights(n)[0], cols, n.attrs["k_chunks"])[..., 0]  # (N, O)
    acc = acc + torch.from_numpy(n.params["bias"].astype(np.int64))
    return nx.requantize(acc, _per_channel(n.params["multiplier"], 2), _per_channel(n.params["shift"], 2),
                         *n.attrs["clamp"])


@kernel("add")
def _add(n: QNode, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    M = n.params["multiplier"].astype(np.int64)
    acc = a.to(torch.int64).mul_(int(M[0])).add_(b.to(torch.int64).mul_(int(M[1])))
    shift = torch.tensor(int(n.params["shift"][0]), dtype=torch.int64)
    return nx.rounding_shift(acc, shift).clamp_(*n.attrs["clamp"]).to(torch.int32)


@kernel("concat")
def _concat(n: QNode, *xs: torch.Tensor) -> torch.Tensor:
    M, sh = n.params["multiplier"].astype(np.int64), n.params["shift"].astype(np.int64)
    parts = [nx.requantize(x.to(torch.int64), torch.tensor(int(m)), torch.tensor(int(s)), *n.attrs["clamp"])
             for x, m, s in zip(xs, M, sh)]
    return torch.cat(parts, 1)


@kernel("gather")
def _gather(n: QNode, x: torch.Tensor) -> torch.Tensor:
    return FLOAT_KERNELS["gather"](n, x)  # pure data movement: the float kernel is exact on integers


@kernel("maxpool")
def _maxpool(n: QNode, x: torch.Tensor) -> torch.Tensor:
    a = n.attrs
    # integers up to 255 are exact in float32; padding reads -inf, never selected over a real value
    y = F.max_pool2d(x.to(torch.float32), a["kernel"], a["stride"], a["padding"])
    return y.to(torch.int32).reshape(len(x), *n.shape)


@kernel("avgpool")
def _avgpool(n: QNode, x: torch.Tensor) -> torch.Tensor:
    a = n.attrs
    # window sums (divisor 1) of at most kh*kw values of magnitude <= 255: exact in float32
    # for windows below 2^24 / 255 = 65,793 elements
    s = F.avg_pool2d(x.to(torch.float32), a["kernel"], a["stride"], a["padding"], divisor_override=1)
    acc = s.to(torch.int64)
    y = nx.requantize(acc, torch.tensor(int(n.params["multiplier"][0])), torch.tensor(int(n.params["shift"][0])),
                      *a["clamp"])
    return y.reshape(len(x), *n.shape)


@kernel("act")
def _act(n: QNode, x: torch.Tensor) -> torch.Tensor:
    return x.clamp(*n.attrs["clamp"])


@kernel("quantize")
def _quantize(n: QNode, x: torch.Tensor) -> torch.Tensor:
    return nx.quantize_input(x, n.scale, *n.attrs["clamp"])


@kernel("dequantize")
def _dequantize(n: QNode, x: torch.Tensor) -> torch.Tensor:
    return nx.dequantize(x, n.scale)


class _ieee_fp32:
    """Pin oneDNN's float32 conv and matmul precision to IEEE while any executor runs (a user
    setting of bf16 or tf32 there would make the integer products inexact).

    The flags are process-wide and the app runs jobs in threads, so the entries are counted under
    one lock: the first executor to enter saves the user's settings and pins IEEE, the last one
    to leave restores them. (Each run saving and restoring on its own would let the first to
    finish restore bf16 under a run still going, and the last leave "ieee" behind for good.)"""

    _lock = threading.Lock()
    _active = 0          # executors running now, in any thread
    _saved: list = []    # (setting, user's value) to restore when the last one leaves (see _pin_ieee)

    def __enter__(self):
        cls = type(self)
        with cls._lock:
            if cls._active == 0:
                cls._saved = _pin_ieee()
            cls._active += 1
        return self

    def __exit__(self, *exc):
        cls = type(self)
        with cls._lock:
            cls._active -= 1
            if cls._active == 0:
                for obj, v in reversed(cls._saved):
                    if obj is None:
                        torch.set_float32_matmul_precision(v)
                    else:
                        obj.fp32_precision = v
                cls._saved = []


def _pin_ieee() -> list:
    """Set IEEE float32 for oneDNN's conv and matmul; returns [(setting, user's value)] to restore
    (None stands for the legacy torch.set_float32_matmul_precision). A torch with per-backend
    ``fp32_precision`` is set through that API only: reading the legacy setting after a user set
    the new one raises ("mix of the legacy and new APIs")."""
    backends = [torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul]
    if all(hasattr(b, "fp32_precision") for b in backends):
        saved = [(b, b.fp32_precision) for b in backends]
        for b in backends:
            b.fp32_precision = "ieee"
        return saved
    saved = [(None, torch.get_float32_matmul_precision())]
    torch.set_float32_matmul_precision("highest")
    return saved


CHUNK_ELEMENTS = 1 << 20
"""Images run together: as many as keep the largest activation of the chunk near 1M elements
(8 MB as int64 accumulators), so the elementwise integer passes work in cache. Example:
ResNet-20's largest activation is 16 x 32 x 32 = 16,384 elements an image -> chunks of 64
images, about 2.5x faster on 1,000 images than one batch of 1,000 (5.5 s -> 2.2 s, Zen 3, 2
threads); a 224 x 224 ResNet-50 (64 x 112 x 112) -> one image. Images are independent, so
chunking changes no value."""


def chunk_images(q: QGraph) -> int:
    """Images per chunk of :func:`run_int8` for ``q`` (see CHUNK_ELEMENTS)."""
    largest = max((int(np.prod(n.shape)) for n in q.nodes if n.shape), default=1)
    return max(1, CHUNK_ELEMENTS // max(largest, 1))


def run_int8(q: QGraph, x, keep: Optional[Iterable[str]] = None) -> dict:
    """Run the integer program on a float batch ``x`` (N, C, H, W). Returns {name: tensor} for
    the output and for ``keep`` (all nodes if None): int32 tensors for integer nodes. A large
    batch runs in chunks of :func:`chunk_images` images, concatenated."""
    x = torch.as_tensor(x, dtype=torch.float32)

    def compute(n, *ins):
        table = INT_KERNELS if (n.quantized or n.op == "dequantize") else FLOAT_KERNELS
        return table[n.op](n, *ins)

    step = chunk_images(q)
    with torch.no_grad(), _ieee_fp32():
        if len(x) <= step:
            return interpret(q.nodes, q.output, x, compute, keep)
        parts = [interpret(q.nodes, q.output, x[i:i + step], compute, keep) for i in range(0, len(x), step)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
