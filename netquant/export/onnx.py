"""ONNX export of the float network and of the integer network (QDQ form).

    from netquant.export import export_float_onnx, export_quantized_onnx
    export_float_onnx(q.graph, "resnet20.onnx")              # the float Graph
    export_quantized_onnx(q.quantize(), "resnet20-int8.onnx")  # the QGraph, as QDQ

Both models take ``images`` float32 (N, C, H, W) with a dynamic batch dimension N (the values
the netquant network takes: images in [0, 1], normalised inside the network) and give
``scores`` (N, classes). Opset 17, IR version 8. Needs the ``onnx`` package
(``pip install 'netquant[onnx]'``); ONNX Runtime runs the result.

Float graph, op by op (every tensor keeps the node's per-image shape behind the batch N):

=========  ====================================================================================
conv       Conv, then Relu (act (0, inf)) or Clip (any other clamp range)
linear     Flatten (input of rank > 2), Gemm (transB=1), then Relu/Clip
add        Add, then Relu/Clip
concat     Concat on axis 1
gather     the ops of a strided view, as torch exports them: Reshape (flatten, view), Slice with
           steps (chunks, x[:, :, ::2, ::2], flips), Transpose (channel shuffle: Reshape,
           Transpose, Reshape), Expand (nearest upsampling, expand_as), Pad (zero padding
           around it); any other index map is a Gather over the flattened image (a zero column
           padded in front when the map reads zeros). See :func:`gather_steps`.
maxpool    MaxPool (then Reshape where the node drops the 1x1 window dims: ``x.mean((2, 3))``)
avgpool    AveragePool with count_include_pad=1 (the same Reshape)
affine     Mul by the per-channel scale, Add the per-channel shift
act        Relu or Clip
float      softmax -> Softmax, log_softmax -> LogSoftmax, sigmoid, tanh, exp, leaky_relu, elu,
           hardswish, hardsigmoid (alpha 1/6, beta 1/2: torch's definition), mul -> Mul,
           interpolate -> Resize to the node's size (N, C from Shape; bilinear, bicubic,
           nearest, nearest-exact with torch's coordinates); gelu -> 0.5 x (1 + Erf(x / sqrt 2))
           and silu -> x Sigmoid(x) (opset 17 has neither as one op). Any other float op raises
           an :class:`OnnxExportError` naming the node.
=========  ====================================================================================

Nodes the output does not depend on are left out. Initializers are named ``<node>.<what>``
(``conv1.weight``, ``input.scale``), never ``<tensor>_scale``: ONNX Runtime's quantizer names
the scale of tensor ``input`` ``input_scale`` and would read a network's own initializer of that
name as it. Layer parameters are never shared between layers (its quantizer rewrites a bias once
per reader). The written model passes ONNX's checker and strict shape inference, so ONNX Runtime
loads it and ``onnxruntime.quantization.quantize_static`` quantizes the float network.

Integer network (QDQ, the form ONNX Runtime fuses into its integer kernels): every integer
tensor of the QGraph (``QNode.quantized``) is a QuantizeLinear of the float result of its op,
with the node's scale and zero point 0 of its type (uint8 or int8), followed by a
DequantizeLinear that its readers use. Weights are int8 initializers (``<node>.weight_int8``)
with a per-channel DequantizeLinear (axis 0, scale ``weight_scale``, zero point 0); biases are
int32 initializers (``<node>.bias_int32``) dequantized at the per-channel scale s_x * s_w. The
input quantization (the ``quantize`` node) is a QuantizeLinear; ``dequantize`` nodes are
DequantizeLinear; float nodes (input normalisation, softmax, sigmoid, resize, layers kept in
float) are exported as in the float graph. A clamp narrower than the type's range (ReLU on an
int8 output, ReLU6, a clamp) is a Relu or Clip before the QuantizeLinear.

A network with 4-bit weight layers (W4A8, quant/int4.py) is written at opset 21 (IR version 10),
the first whose DequantizeLinear takes INT4: those layers' weights are INT4 initializers
(``<node>.weight_int4``, two per byte, the quantizer file's packing) with a per-channel
DequantizeLinear (axis 0, INT4 zero point 0); every other op is the same at opset 21. ONNX Runtime
runs it with the same top-1 class as the reference executor on 100% of 200 CIFAR-10 test images
for the W4A8 ResNet of ``tests/zoo.py`` (tests/test_int4.py).

ONNX's QuantizeLinear rounds half to even and ONNX Runtime requantizes with a float multiplier,
where netquant rounds half up with an integer (M, shift) (docs/NUMERICS.md): the exported integer
network agrees with the reference executor up to those roundings (an LSB here and there), not bit
for bit: the same top-1 class on 100% of 1,000 CIFAR-10 test images for the shipped ResNet-20 with
the default scheme, and on 100% of 100 test images for each network of ``tests/zoo.py`` (ResNets
with option A and B shortcuts, VGG, MobileNetV2, ShuffleNetV2, LeNet, an FPN with nearest and
bilinear upsampling, squeeze-excitation with hard-swish; scores within 2 LSB). Power-of-two scales (targets fpga, matlab) make exact halves common (an add
whose input scales differ by 2x), so there the classes agree less often (98.6% of 500 images).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Union

import numpy as np

from ..errors import NetquantError
from ..ir.graph import Graph
from ..ir.ops import WEIGHTED_OPS
from ..quant import numerics as nx
from ..quant.int4 import is_int4, pack
from ..quant.qgraph import QGraph

OPSET = 17
IR_VERSION = 8            # the IR version of opset 17: any runtime that reads opset 17 reads it
INPUT_NAME = "images"
OUTPUT_NAME = "scores"
_ONNX_DTYPE = {"int8": np.int8, "uint8": np.uint8}
EXPORTED_FLOAT_FNS = ("softmax", "log_softmax", "sigmoid", "tanh", "exp", "hardswish", "hardsigmoid", "leaky_relu",
                      "elu", "mul", "silu", "gelu", "interpolate")
# torch's interpolate modes -> ONNX Resize (mode, coordinate_transformation_mode, nearest_mode)
# for align_corners=False: torch's "nearest" reads floor(dst * in/out) (asymmetric, floor) and
# "nearest-exact" floor((dst + 0.5) * in/out) (half pixel, round half up); bilinear is
# pytorch_half_pixel (half pixel, but source 0 where the output has one pixel); bicubic is half
# pixel with A = -0.75, torch's and ONNX's default.
_RESIZE = {"nearest": ("nearest", "asymmetric", "floor"),
           "nearest-exact": ("nearest", "half_pixel", "round_prefer_ceil"),
           "bilinear": ("linear", "pytorch_half_pixel", None),
           "bicubic": ("cubic", "half_pixel", None)}


class OnnxExportError(NetquantError, ValueError):
    """A graph that cannot be written as ONNX (names the node and why)."""


def _onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX export needs the onnx package: pip install 'netquant[onnx]'") from e
    return onnx


# --- a small graph builder ------------------------------------------------------------------

class _Builder:
    """Collects ONNX nodes and initializers with unique tensor names."""

    def __init__(self):
        self.onnx = _onnx()
        self.nodes: list = []
        self.inits: list = []
        self.used: set = {INPUT_NAME, OUTPUT_NAME}
        self.consts: dict = {}   # (dtype, shape, bytes) -> initializer name (shared constants)
        self.opset, self.ir_version = OPSET, IR_VERSION   # quantized_onnx: opset 21 for 4-bit weights

    def unique(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c in "_.-/:" else "_" for c in hint) or "t"
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def const(self, hint: str, value: np.ndarray, share: bool = True) -> str:
        """An initializer holding ``value``; equal constants are one initializer unless
        ``share`` is False. Layer parameters (weights, biases, affine scales) are never shared:
        ONNX Runtime's quantizer rewrites an initializer once per reader, so two convs sharing
        one all-zero bias made it fail ("cannot reshape array of size 72 into shape (24,)")."""
        value = np.array(value, order="C")   # (np.ascontiguousarray would make a scalar 1-d)
        key = (value.dtype.str, value.shape, value.tobytes())
        if share and key in self.consts:
            return self.consts[key]
        name = self.unique(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(value, name))
        if share:
            self.consts[key] = name
        return name

    def op(self, op_type: str, inputs, hint: str, out: Optional[str] = None, **attrs) -> str:
        """Append one node; returns its output tensor name (``out`` if given, else a fresh one
        from ``hint``)."""
        if out is None:
            out = self.unique(hint)
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], name=self.unique(f"{hint}/{op_type}"),
                                                     **attrs))
        return out

    def model(self, input_shape, output_shape, doc: str):
        onnx = self.onnx
        h = onnx.helper
        x = h.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["N", *input_shape])
        y = h.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, ["N", *output_shape])
        graph = h.make_graph(self.nodes, "netquant", [x], [y], self.inits)
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", self.opset)], ir_version=self.ir_version,
                             producer_name="netquant", doc_string=doc)
        from .. import __version__

        model.producer_version = __version__
        onnx.checker.check_model(model)
        # strict shape inference: an op given a shape it does not accept (a Gemm fed a 4-D
        # tensor) fails here, at export, not when ONNX Runtime loads the file
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        return model


def _f32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def _per_channel_shape(v: np.ndarray, rank: int) -> np.ndarray:
    """(C,) -> (C, 1, ..., 1) broadcasting along axis 1 of a rank-``rank`` tensor."""
    return v.reshape(-1, *([1] * (rank - 2)))


# --- float ops ------------------------------------------------------------------------------

def _clamp(b: _Builder, x: str, lo: float, hi: float, hint: str, out=None) -> str:
    """Relu for (0, inf), Clip(lo, hi) otherwise (an infinite bound is left out)."""
    if lo == 0 and hi == math.inf:
        return b.op("Relu", [x], hint, out)
    if lo == -math.inf and hi == math.inf:
        return b.op("Identity", [x], hint, out)
    ins = [x, "" if lo == -math.inf else b.const(f"{hint}.min", _f32(lo)),
           "" if hi == math.inf else b.const(f"{hint}.max", _f32(hi))]
    while ins[-1] == "":
        ins.pop()
    return b.op("Clip", ins, hint, out)


def _act(b: _Builder, x: str, act, hint: str, out=None) -> str:
    if act is None:
        return x if out is None else b.op("Identity", [x], hint, out)
    lo, hi = act
    return _clamp(b, x, float(lo), float(hi), hint, out)


# --- gathers --------------------------------------------------------------------------------
#
# A gather node holds an index map (netquant/ir/graph.py): output element i of an image is input
# element index[i] - 1, or 0 where index[i] == 0. The maps networks make are strided views of
# the input (flatten, view, transpose, slices with steps, chunks, channel shuffles, flips, nearest
# upsampling), possibly zero-padded around; they are written as the ops a torch export uses
# (Reshape, Slice, Transpose, Expand, Pad), so ONNX Runtime and its quantizer see ordinary data
# movement. Any other map is a Gather over the flattened image. Each plan is a list of steps
# (kind, argument) on the per-image tensor; it is replayed in numpy on the element numbers and
# compared with the index before it is written, so no plan that misreads the index is exported.

def _strides(shape) -> list:
    """Row-major element strides: (16, 8, 8) -> [64, 8, 1]."""
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= int(d)
    return out[::-1]


def _line_axes(line: np.ndarray) -> Optional[list]:
    """Split one output axis, given the input offsets ``line`` along it, into sub-axes of
    constant stride, outer first, as (extent, stride) pairs. A shuffle of 4 channels of 64
    pixels reads [0, 128, 64, 192]: [(2, 64), (2, 128)]; nearest 2x upsampling of a row reads
    [0, 0, 1, 1, 2, 2]: [(3, 1), (2, 0)]. None when there is no such split."""
    subs = []
    line = line - line[0]
    while len(line) > 1:
        steps = np.diff(line)
        breaks = np.flatnonzero(steps != steps[0])
        run = int(breaks[0]) + 1 if len(breaks) else len(line)      # length of the arithmetic prefix
        r = run if len(line) % run == 0 else max(d for d in range(1, run) if len(line) % d == 0)
        if r == 1:
            return None
        subs.append((r, int(steps[0])))
        line = line[::r] - line[0]
    return subs[::-1]


def _sub_axes(f: np.ndarray) -> Optional[list]:
    """(extent, stride) sub-axes, in output order, of every axis of the offsets ``f``."""
    subs = []
    for j in range(f.ndim):
        axes = _line_axes(f[(0,) * j + (slice(None),) + (0,) * (f.ndim - j - 1)])
        if axes is None:
            return None
        subs.extend(axes)
    return subs


def _split_at(subs: list, strides: list) -> list:
    """Sub-axes cut where they cross a stride of the base shape: the 256 pixels (256, 1) of a
    (C, 16, 16) input become (16, 16), (16, 1). The same offsets in the same order."""
    out = []
    for e, s in subs:
        parts = [(e, s)]
        for big in strides:
            e0, s0 = parts[0]
            a = abs(s0)
            if a and a < big < e0 * a and big % a == 0 and e0 % (big // a) == 0:
                parts[0:1] = [(e0 * a // big, big if s0 > 0 else -big), (big // a, s0)]
        out.extend(parts)
    return out


def _stride_base(subs: list, size: int) -> Optional[tuple]:
    """The shape whose axes are the view's distinct strides, largest first: a shuffle of two
    groups of channels of a (16, 16, 16) input reads channels at strides 2048 and 256, rows at
    16 and columns at 1, so (2, 8, 16, 16). None when the strides do not nest."""
    strides = sorted({abs(s) for _, s in subs if s}, reverse=True)
    if not strides or size % strides[0]:
        return None
    dims = [size // strides[0]]
    for a, b in zip(strides, strides[1:]):
        if a % b:
            return None
        dims.append(a // b)
    if strides[-1] > 1:
        dims.append(strides[-1])
    return tuple(dims)


def _view_steps(f: np.ndarray, subs: list, base: tuple) -> Optional[list]:
    """Steps that read the strided view with offsets ``f`` (shaped like the output) and
    sub-axes ``subs`` from the input seen as ``base``: Reshape to ``base``, one Slice (start,
    end, step per cut axis; every sub-axis on its own base axis), Transpose to output order,
    Reshape with ones for the repeated (stride 0) sub-axes, Expand, Reshape to the output. None
    when the view does not fit ``base``."""
    bstr = _strides(base)
    subs = _split_at(subs, bstr)
    origin = int(f.reshape(-1)[0])
    starts = [(origin // s) % int(d) for s, d in zip(bstr, base)]
    used: dict = {}                              # base axis -> (sub-axis number, step)
    for k, (e, s) in enumerate(subs):
        if s == 0:
            continue
        d = next((d for d, bs in enumerate(bstr) if base[d] > 1 and bs <= abs(s) and abs(s) % bs == 0), None)
        if d is None or d in used or not 0 <= starts[d] + (e - 1) * (s // bstr[d]) < base[d]:
            return None
        used[d] = (k, s // bstr[d])
    cuts = []
    for d, size in enumerate(base):
        if d not in used:
            if size > 1:
                cuts.append((d, starts[d], starts[d] + 1, 1))
            continue
        k, step = used[d]
        end = starts[d] + subs[k][0] * step
        end = min(end, size) if step > 0 else (end if end >= 0 else -(size + 1))   # -(size+1): "before 0"
        if (starts[d], end, step) != (0, size, 1):
            cuts.append((d, starts[d], end, step))
    steps = [("reshape", tuple(base))]
    if cuts:
        steps.append(("slice", tuple(cuts)))
    order = sorted(used, key=lambda d: used[d][0]) + [d for d in range(len(base)) if d not in used]
    if order != list(range(len(base))):
        steps.append(("transpose", tuple(order)))
    steps.append(("reshape", tuple(e if s else 1 for e, s in subs)))
    if any(s == 0 for _, s in subs):
        steps.append(("expand", tuple(1 if s else e for e, s in subs)))
    steps.append(("reshape", tuple(f.shape)))
    return steps


def _replay(steps: list, x: np.ndarray) -> np.ndarray:
    """Run ``steps`` in numpy on ``x`` (1, *shape) as ONNX runs them."""
    for kind, arg in steps:
        if kind == "reshape":
            x = x.reshape(1, *arg)
        elif kind == "slice":
            cut = [slice(None)] * x.ndim
            for d, start, end, step in arg:
                cut[d + 1] = slice(start, end, step)
            x = x[tuple(cut)]
        elif kind == "transpose":
            x = x.transpose(0, *(d + 1 for d in arg))
        elif kind == "expand":
            x = np.broadcast_to(x, np.broadcast_shapes(x.shape, (1, *arg)))
        elif kind == "pad":
            x = np.pad(x, ((0, 0), *arg))
        elif kind == "gather":   # a zero in front: index 0 reads it, index i reads element i-1
            x = np.concatenate([np.zeros((1, 1), x.dtype), x.reshape(1, -1)], 1)[:, arg]
        else:  # pragma: no cover - the planner makes only the kinds above
            raise AssertionError(kind)
    return x


def _tidy(steps: list, in_shape: tuple) -> list:
    """Merge consecutive reshapes and drop reshapes to the shape the tensor already has."""
    merged: list = []
    for step in steps:
        if step[0] == "reshape" and merged and merged[-1][0] == "reshape":
            merged.pop()
        merged.append(step)
    out, x = [], np.zeros((1, *in_shape), np.int8)
    for step in merged:
        y = _replay([step], x)
        if step[0] != "reshape" or y.shape != x.shape:
            out.append(step)
        x = y
    return out


def gather_steps(index: np.ndarray, in_shape: tuple, out_shape: tuple) -> list:
    """The steps that export a gather from per-image shape ``in_shape`` to ``out_shape`` (kinds
    reshape, slice, transpose, expand, pad, gather; see the comment above). Option A's
    shortcut of a ResNet, ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))`` on (8, 32, 32):
    [slice ((1, 0, 32, 2), (2, 0, 32, 2)), pad ((4, 4), (0, 0), (0, 0))]."""
    in_shape, out_shape = tuple(int(d) for d in in_shape), tuple(int(d) for d in out_shape)
    index = np.asarray(index, np.int64)
    size = int(np.prod(in_shape))
    if index.shape != (int(np.prod(out_shape)),) or index.min(initial=0) < 0 or index.max(initial=0) > size:
        raise OnnxExportError(f"gather index of shape {index.shape} with values in [{index.min(initial=0)}, "
                              f"{index.max(initial=0)}]: expected {int(np.prod(out_shape))} values in [0, {size}]")
    plans = []
    idx = index.reshape(out_shape)
    mask = idx > 0
    if mask.any():
        box = tuple(slice(int(w.min()), int(w.max()) + 1) for w in np.nonzero(mask))
        if int(mask.sum()) == mask[box].size:       # the zeros (if any) pad around a box
            f = idx[box] - 1
            pads = tuple((b.start, o - b.stop) for b, o in zip(box, out_shape))
            tail = [("pad", pads)] if any(p != (0, 0) for p in pads) else []
            subs = _sub_axes(f)
            if subs is not None:
                # the input's own shape first (Slice with steps: what torch exports for x[:, ::2]),
                # then the shape of the view's strides (Reshape + Transpose: a channel shuffle)
                for base in (in_shape, _stride_base(subs, size)):
                    steps = _view_steps(f, subs, base) if base else None
                    if steps is not None:
                        plans.append(steps + tail)
    plans.append([("gather", index), ("reshape", out_shape)])
    numbers = np.arange(1, size + 1, dtype=np.int64).reshape(1, *in_shape)
    for steps in plans:
        got = _replay(steps, numbers)
        if got.shape == (1, *out_shape) and np.array_equal(got.reshape(-1), index):
            return _tidy(steps, in_shape)
    raise AssertionError("the Gather plan does not reproduce its index")   # pragma: no cover


def _gather(b: _Builder, n, x: str, in_shape: tuple, out=None) -> str:
    """Gather node ``n`` on tensor ``x`` (per-image shape ``in_shape``)."""
    try:
        steps = gather_steps(n.params["index"], in_shape, n.shape)
    except OnnxExportError as e:
        raise OnnxExportError(f"node {n.name!r}: {e}") from None
    if not steps:   # the same elements in the same shape
        return b.op("Identity", [x], n.name, out)
    for k, (kind, arg) in enumerate(steps):
        last = k == len(steps) - 1
        hint, o = (n.name, out) if last else (f"{n.name}_{kind}", None)
        if kind == "reshape":   # 0: the batch dimension N of the input, whatever it is
            x = b.op("Reshape", [x, b.const(f"{n.name}.shape", np.array([0, *arg], np.int64))], hint, o)
        elif kind == "slice":
            axes, starts, ends, steps_ = (np.array(v, np.int64) for v in zip(*arg))
            x = b.op("Slice", [x, b.const(f"{n.name}.starts", starts), b.const(f"{n.name}.ends", ends),
                               b.const(f"{n.name}.axes", axes + 1), b.const(f"{n.name}.steps", steps_)], hint, o)
        elif kind == "transpose":
            x = b.op("Transpose", [x], hint, o, perm=[0, *(d + 1 for d in arg)])
        elif kind == "expand":
            x = b.op("Expand", [x, b.const(f"{n.name}.expand", np.array([1, *arg], np.int64))], hint, o)
        elif kind == "pad":
            pads = [0, *(p for p, _ in arg), 0, *(p for _, p in arg)]
            x = b.op("Pad", [x, b.const(f"{n.name}.pads", np.array(pads, np.int64))], hint, o, mode="constant")
        else:   # gather: over the flattened image, a zero column in front when index 0 occurs
            index = np.asarray(arg, np.int64)
            x = b.op("Flatten", [x], f"{n.name}_flat", axis=1)
            if (index == 0).any():
                x = b.op("Pad", [x, b.const("const.pad_one_front", np.array([0, 1, 0, 0], np.int64))],
                         f"{n.name}_pad", mode="constant")
            else:
                index = index - 1
            x = b.op("Gather", [x, b.const(f"{n.name}.index", index)], hint, o, axis=1)
    return x


def _float_op(b: _Builder, n, xs: list, out=None) -> str:
    fn = n.attrs.get("fn")
    kwargs = dict(n.attrs.get("kwargs") or {})

    def no_kwargs(*allowed):
        extra = set(kwargs) - set(allowed)
        if extra:
            raise OnnxExportError(f"node {n.name!r}: float op {fn!r} with arguments {sorted(extra)} has no ONNX export")

    x = xs[0]
    if fn in ("softmax", "log_softmax"):
        no_kwargs("dim")
        dim = kwargs.get("dim", 1)
        if dim is None:
            raise OnnxExportError(f"node {n.name!r}: {fn} without a dim (torch's implicit dim) has no ONNX export")
        return b.op("Softmax" if fn == "softmax" else "LogSoftmax", [x], n.name, out, axis=int(dim))
    simple = {"sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp", "hardswish": "HardSwish"}
    if fn in simple:
        no_kwargs()
        return b.op(simple[fn], [x], n.name, out)
    if fn == "hardsigmoid":
        no_kwargs()
        return b.op("HardSigmoid", [x], n.name, out, alpha=1.0 / 6.0, beta=0.5)
    if fn == "leaky_relu":
        no_kwargs("negative_slope")
        return b.op("LeakyRelu", [x], n.name, out, alpha=float(kwargs.get("negative_slope", 0.01)))
    if fn == "elu":
        no_kwargs("alpha")
        return b.op("Elu", [x], n.name, out, alpha=float(kwargs.get("alpha", 1.0)))
    if fn == "mul":
        no_kwargs()
        return b.op("Mul", [xs[0], xs[1]], n.name, out)
    if fn == "silu":
        no_kwargs()
        return b.op("Mul", [x, b.op("Sigmoid", [x], f"{n.name}_sigmoid")], n.name, out)
    if fn == "interpolate":
        return _resize(b, n, x, kwargs, out)
    if fn == "gelu":   # torch's exact GELU: x/2 (1 + erf(x/sqrt(2)))
        no_kwargs()
        e = b.op("Erf", [b.op("Mul", [x, b.const("const.inv_sqrt2", _f32(1 / math.sqrt(2)))], f"{n.name}_scaled")],
                 f"{n.name}_erf")
        one = b.op("Add", [e, b.const("const.one", _f32(1.0))], f"{n.name}_1p")
        half = b.op("Mul", [x, b.const("const.half", _f32(0.5))], f"{n.name}_half")
        return b.op("Mul", [half, one], n.name, out)
    raise OnnxExportError(f"node {n.name!r}: float op {fn!r} has no ONNX export (exported float ops: "
                          f"{', '.join(EXPORTED_FLOAT_FNS)})")


def _resize(b: _Builder, n, x: str, kwargs: dict, out=None) -> str:
    """torch's F.interpolate(x, size, mode, align_corners) as Resize to ``sizes`` (N and C
    read from the input with Shape, so the batch stays dynamic; scales would give
    floor(in * float32(out/in)), one pixel short for 7/3)."""
    extra = set(kwargs) - {"size", "mode", "align_corners"}
    mode = kwargs.get("mode", "bilinear")
    corners = bool(kwargs.get("align_corners") or False)
    if extra or mode not in _RESIZE or "size" not in kwargs or (corners and mode not in ("bilinear", "bicubic")):
        raise OnnxExportError(f"node {n.name!r}: interpolate with {kwargs} has no ONNX export (modes: "
                              f"{', '.join(_RESIZE)}, align_corners only with bilinear and bicubic, size given)")
    size = np.array([int(v) for v in np.atleast_1d(kwargs["size"])], np.int64)
    kind, coords, nearest = _RESIZE[mode]
    attrs = {"mode": kind, "coordinate_transformation_mode": "align_corners" if corners else coords}
    if nearest:
        attrs["nearest_mode"] = nearest
    if kind == "cubic":
        attrs["cubic_coeff_a"] = -0.75
    lead = b.op("Shape", [x], f"{n.name}_lead", start=0, end=len(n.shape) + 1 - len(size))   # (N, C)
    sizes = b.op("Concat", [lead, b.const(f"{n.name}.size", size)], f"{n.name}_sizes", axis=0)
    return b.op("Resize", [x, "", "", sizes], n.name, out, **attrs)


def _live(nodes, output: str) -> set:
    """Names of the nodes the output depends on: a layer whose result nothing reads is not
    exported (ONNX Runtime would compute it and its quantizer calibrate it for nothing)."""
    by_name = {n.name: n for n in nodes}
    live, todo = set(), [output]
    while todo:
        name = todo.pop()
        if name not in live:
            live.add(name)
            todo.extend(by_name[name].inputs)
    return live


def _pool_attrs(a: dict) -> dict:
    ph, pw = a["padding"]
    return {"kernel_shape": list(a["kernel"]), "strides": list(a["stride"]), "pads": [ph, pw, ph, pw]}


def _compute(b: _Builder, n, xs: list, in_shapes: list, weights: Optional[tuple] = None, out=None,
             with_act: bool = True) -> str:
    """The float computation of node ``n`` (a Node, or a QNode of the same op) on ONNX tensors
    ``xs`` (their per-image shapes ``in_shapes``). ``weights``: (weight, bias) tensor names that
    replace the node's float params (the dequantized int8 weights of the QDQ form)."""
    if n.op not in EXPORTS:
        raise OnnxExportError(f"node {n.name!r}: op {n.op!r} has no ONNX export")
    return EXPORTS[n.op](b, n, xs, in_shapes, weights, out, with_act)


def _weighted(b: _Builder, n, xs: list, in_shapes: list, weights, out, with_act: bool) -> str:
    a = n.attrs
    if weights is None:
        weights = (b.const(f"{n.name}.weight", _f32(n.params["weight"]), share=False),
                   b.const(f"{n.name}.bias", _f32(n.params["bias"]), share=False))
    act = a.get("act") if with_act else None
    if n.op == "conv":
        ph, pw = a["padding"]
        w_shape = n.params["weight"].shape
        y = b.op("Conv", [xs[0], *weights], n.name if act is None else f"{n.name}_conv",
                 None if act is not None else out, kernel_shape=list(w_shape[2:]), strides=list(a["stride"]),
                 pads=[ph, pw, ph, pw], dilations=list(a["dilation"]), group=int(a["groups"]))
    else:
        x = xs[0]
        if len(in_shapes[0]) != 1:
            x = b.op("Flatten", [x], f"{n.name}_flatten", axis=1)
        y = b.op("Gemm", [x, *weights], n.name if act is None else f"{n.name}_gemm",
                 None if act is not None else out, transB=1)
    return y if act is None else _act(b, y, act, n.name, out)


def _add(b: _Builder, n, xs: list, in_shapes: list, weights, out, with_act: bool) -> str:
    act = n.attrs.get("act") if with_act else None
    y = b.op("Add", xs, n.name if act is None else f"{n.name}_add", None if act is not None else out)
    return y if act is None else _act(b, y, act, n.name, out)


def _pool(b: _Builder, n, xs: list, in_shapes: list, weights, out, with_act: bool) -> str:
    kind, kw = ("MaxPool", {}) if n.op == "maxpool" else ("AveragePool", {"count_include_pad": 1})
    if len(n.shape) == 3:
        return b.op(kind, xs, n.name, out, **kw, **_pool_attrs(n.attrs))
    # a node that drops the 1x1 window dims (x.mean((2, 3)): shape (C,)); the pool gives (N, C, 1, 1)
    y = b.op(kind, xs, f"{n.name}_pool", **kw, **_pool_attrs(n.attrs))
    return b.op("Reshape", [y, b.const(f"{n.name}.shape", np.array([0, *n.shape], np.int64))], n.name, out)


def _affine(b: _Builder, n, xs: list, in_shapes: list, weights, out, with_act: bool) -> str:
    rank = len(in_shapes[0]) + 1
    y = b.op("Mul", [xs[0], b.const(f"{n.name}.scale", _per_channel_shape(_f32(n.params["scale"]), rank),
                                    share=False)], f"{n.name}_mul")
    return b.op("Add", [y, b.const(f"{n.name}.shift", _per_channel_shape(_f32(n.params["shift"]), rank),
                                   share=False)], n.name, out)


# the ONNX form of each float computation, per op kind of the table (netquant/ir/ops.py: every
# GRAPH kind but the input, tests/test_op_table.py); each takes (builder, node, inputs, their
# shapes, (weight, bias) names or None, output name or None, whether to apply a fused activation)
EXPORTS = {
    "conv": _weighted, "linear": _weighted, "add": _add, "maxpool": _pool, "avgpool": _pool, "affine": _affine,
    "concat": lambda b, n, xs, shapes, w, out, act: b.op("Concat", xs, n.name, out, axis=1),
    "gather": lambda b, n, xs, shapes, w, out, act: _gather(b, n, xs[0], shapes[0], out),
    "act": lambda b, n, xs, shapes, w, out, act: _act(b, xs[0], n.attrs["act"], n.name, out) if act else xs[0],
    "float": lambda b, n, xs, shapes, w, out, act: _float_op(b, n, xs, out),
}


def _write(model, path) -> None:
    from ..fileio import write_bytes

    write_bytes(os.fspath(path), model.SerializeToString())   # atomic: the old file or the whole new one


# --- float network --------------------------------------------------------------------------

def float_onnx(graph: Graph):
    """The float Graph as an ``onnx.ModelProto`` (see the module docstring)."""
    b = _Builder()
    tensors: dict = {}
    shapes = {n.name: n.shape for n in graph.nodes}
    live = _live(graph.nodes, graph.output)
    for n in graph.nodes:
        if n.name not in live:
            continue
        if n.op == "input":
            tensors[n.name] = INPUT_NAME
            continue
        out = OUTPUT_NAME if n.name == graph.output else None
        tensors[n.name] = _compute(b, n, [tensors[i] for i in n.inputs], [shapes[i] for i in n.inputs], out=out)
    if graph.output == graph.input.name:
        b.op("Identity", [INPUT_NAME], "output", OUTPUT_NAME)
    return b.model(graph.input.shape, graph.node(graph.output).shape,
                   f"netquant float network {graph.source or ''}".strip())


def export_float_onnx(graph: Graph, path) -> "onnx.ModelProto":
    """Write the float Graph ``graph`` to ``path`` as ONNX (opset 17): input ``images`` float32
    (N, C, H, W), output ``scores``. Returns the ``onnx.ModelProto``. Nothing is written when
    the graph has an op without an ONNX export (an :class:`OnnxExportError` names the node)."""
    model = float_onnx(graph)
    _write(model, path)
    return model


# --- integer network (QDQ) ------------------------------------------------------------------

def _as_qgraph(obj) -> QGraph:
    if isinstance(obj, QGraph):
        return obj
    if isinstance(getattr(obj, "qgraph", None), QGraph):      # QuantizedNetwork
        return obj.qgraph
    if callable(getattr(obj, "quantize", None)):               # a calibrated Quantizer
        return obj.quantize().qgraph
    raise TypeError(f"expected a QuantizedNetwork, a QGraph or a Quantizer, got {type(obj).__name__}")


def quantized_onnx(qnet_or_qgraph):
    """The integer network as an ``onnx.ModelProto`` in QDQ form (see the module docstring)."""
    q = _as_qgraph(qnet_or_qgraph)
    b = _Builder()
    fl: dict = {}      # node name -> float tensor (float nodes; the DequantizeLinear of integer nodes)
    qt: dict = {}      # integer node name -> (int tensor, scale const, zero point const)
    nodes = {n.name: n for n in q.nodes}
    live = _live(q.nodes, q.output)
    if any(is_int4(n) for n in q.nodes if n.name in live):
        b.opset, b.ir_version = INT4_OPSET, INT4_IR_VERSION

    def qparams(n) -> tuple[str, str]:
        if n.dtype not in _ONNX_DTYPE:
            raise OnnxExportError(f"node {n.name!r}: integer type {n.dtype!r} has no QDQ export")
        return (b.const(f"{n.name}.scale", _f32(n.scale)),
                b.const(f"const.zero_{n.dtype}", np.zeros((), _ONNX_DTYPE[n.dtype])))

    def narrowed(n, y: str) -> str:
        """A Relu/Clip for a clamp narrower than the type's range (the QuantizeLinear saturates
        to the type's range by itself)."""
        lo, hi = n.attrs.get("clamp", nx.dtype_range(n.dtype))
        tlo, thi = nx.dtype_range(n.dtype)
        if (lo, hi) == (tlo, thi):
            return y
        rlo = float(lo) * float(np.float32(n.scale)) if lo > tlo else -math.inf
        rhi = float(hi) * float(np.float32(n.scale)) if hi < thi else math.inf
        return _clamp(b, y, rlo, rhi, f"{n.name}_clamp")

    def to_int(n, y: str) -> None:
        scale, zero = qparams(n)
        qv = b.op("QuantizeLinear", [narrowed(n, y), scale, zero], f"{n.name}_q")
        qt[n.name] = (qv, scale, zero)
        fl[n.name] = b.op("DequantizeLinear", [qv, scale, zero], f"{n.name}_dq")

    def int_weights(n) -> tuple[str, str]:
        x = nodes[n.inputs[0]]
        s_w = np.asarray(n.params["weight_scale"], np.float64)
        o = len(n.params["weight"])
        bq = np.asarray(n.params["bias"], np.int32)
        if is_int4(n):   # 4-bit weights: an INT4 initializer (opset 21)
            w = int4_weights(b, n)
        else:
            w = b.op("DequantizeLinear", [b.const(f"{n.name}.weight_int8", np.asarray(n.params["weight"], np.int8),
                                                  share=False),
                                          b.const(f"{n.name}.scale_weight", _f32(s_w), share=False),
                                          b.const(f"const.zero_int8_x{o}", np.zeros(o, np.int8))],
                     f"{n.name}_weight", axis=0)
        bias = b.op("DequantizeLinear", [b.const(f"{n.name}.bias_int32", bq, share=False),
                                         b.const(f"{n.name}.scale_bias", _f32(x.scale * s_w), share=False),
                                         b.const(f"const.zero_int32_x{o}", np.zeros(o, np.int32))],
                    f"{n.name}_bias", axis=0)
        return w, bias

    for n in q.nodes:
        if n.name not in live:
            continue
        out = OUTPUT_NAME if n.name == q.output else None
        if n.op == "input":
            fl[n.name] = INPUT_NAME
            continue
        if n.op == "dequantize":
            src = qt.get(n.inputs[0])
            if src is None:
                raise OnnxExportError(f"node {n.name!r}: dequantizes {n.inputs[0]!r}, which is not an integer tensor")
            qv, scale, zero = src
            fl[n.name] = b.op("DequantizeLinear", [qv, scale, zero], n.name, out)
            continue
        if not n.quantized:   # float nodes: input normalisation, softmax, layers kept in float
            fl[n.name] = _compute(b, n, [fl[i] for i in n.inputs], [nodes[i].shape for i in n.inputs], out=out)
            continue
        xs = [fl[i] for i in n.inputs]
        for i in n.inputs:
            if n.op != "quantize" and i not in qt:
                raise OnnxExportError(f"node {n.name!r}: integer op reads {i!r}, which is not an integer tensor")
        if n.op == "quantize":
            y = xs[0]
        else:
            weights = int_weights(n) if n.op in WEIGHTED_OPS else None
            y = _compute(b, n, xs, [nodes[i].shape for i in n.inputs], weights=weights, with_act=False)
        to_int(n, y)
        if out is not None:   # an integer output: give its float value
            b.op("Identity", [fl[n.name]], "output", out)
    return b.model(nodes[q.input].shape, nodes[q.output].shape, "netquant int8 network (QDQ)")


INT4_OPSET, INT4_IR_VERSION = 21, 10   # the first opset whose DequantizeLinear takes INT4 (and its IR version)


def int4_weights(b: _Builder, n) -> str:
    """The float weights of a 4-bit layer: an INT4 initializer ``<node>.weight_int4`` (ONNX packs it
    two per byte, element 2i in the low nibble: quant/int4.py's order) through a per-channel
    DequantizeLinear (axis 0, scale ``weight_scale``, INT4 zero point 0)."""
    onnx = b.onnx
    wq = np.asarray(n.params["weight"], np.int8)
    o = len(wq)
    codes, zeros = b.unique(f"{n.name}.weight_int4"), b.unique(f"{n.name}.zero_int4")
    # raw bytes: quant/int4.pack's nibble order is ONNX's, so the file holds the same two-per-byte codes
    b.inits.append(onnx.helper.make_tensor(codes, onnx.TensorProto.INT4, wq.shape, pack(wq).tobytes(), raw=True))
    b.inits.append(onnx.helper.make_tensor(zeros, onnx.TensorProto.INT4, (o,), pack(np.zeros(o, np.int8)).tobytes(),
                                           raw=True))
    return b.op("DequantizeLinear", [codes, b.const(f"{n.name}.scale_weight", _f32(n.params["weight_scale"]),
                                                    share=False), zeros], f"{n.name}_weight", axis=0)


def export_quantized_onnx(qnet_or_qgraph: Union[QGraph, object], path) -> "onnx.ModelProto":
    """Write the integer network (a QuantizedNetwork, its QGraph, or a calibrated Quantizer) to
    ``path`` as ONNX in QDQ form (see the module docstring). Returns the ``onnx.ModelProto``."""
    model = quantized_onnx(qnet_or_qgraph)
    _write(model, path)
    return model
