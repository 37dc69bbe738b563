"""ONNX export of the float network and of the integer network (QDQ form).

    from netquant.export import export_float_onnx, export_quantized_onnx
    export_float_onnx(q.graph, "resnet20.onnx")              # the float Graph
    export_quantized_onnx(q.quantize(), "resnet20-int8.onnx")  # the QGraph, as QDQ

Both models take ``images`` float32 (N, C, H, W) with a dynamic batch dimension N (the values
the netquant network takes: images in [0, 1], normalised inside the network) and give
``scores`` (N, classes). Opset 17, IR version 8. Needs the ``onnx`` package
(``pip install 'netquant[onnx]'``); ONNX Runtime runs the result.

Float graph, op by op:

=========  ====================================================================================
conv       Conv, then Relu (act (0, inf)) or Clip (any other clamp range)
linear     Flatten (input of rank > 2), Gemm (transB=1), then Relu/Clip
add        Add, then Relu/Clip
concat     Concat on axis 1
gather     Reshape (an identity index: a flatten or view), Slice (a contiguous range), else
           Reshape to (N, -1), Pad with one zero column in front when the index has zeros (index
           0 reads it, index i reads element i-1), Gather on axis 1, Reshape to (N, *shape)
maxpool    MaxPool
avgpool    AveragePool with count_include_pad=1
affine     Mul by the per-channel scale, Add the per-channel shift
act        Relu or Clip
float      softmax -> Softmax, log_softmax -> LogSoftmax, sigmoid, tanh, exp, leaky_relu, elu,
           hardswish, hardsigmoid (alpha 1/6, beta 1/2: torch's definition), mul -> Mul;
           gelu -> 0.5 x (1 + Erf(x / sqrt 2)) and silu -> x Sigmoid(x) (opset 17 has neither as
           one op). Any other float op raises an :class:`OnnxExportError` naming the node.
=========  ====================================================================================

Integer network (QDQ, the form ONNX Runtime fuses into its integer kernels): every integer
tensor of the QGraph (``QNode.quantized``) is a QuantizeLinear of the float result of its op,
with the node's scale and zero point 0 of its type (uint8 or int8), followed by a
DequantizeLinear that its readers use. Weights are int8 initializers with a per-channel
DequantizeLinear (axis 0, scale ``weight_scale``, zero point 0); biases are int32 initializers
dequantized at the per-channel scale s_x * s_w. The input quantization (the ``quantize`` node) is
a QuantizeLinear; ``dequantize`` nodes are DequantizeLinear; float nodes (input normalisation,
softmax, layers kept in float) are exported as in the float graph. A clamp narrower than the
type's range (ReLU on an int8 output, ReLU6, a clamp) is a Relu or Clip before the
QuantizeLinear.

ONNX's QuantizeLinear rounds half to even and ONNX Runtime requantizes with a float multiplier,
where netquant rounds half up with an integer (M, shift) (docs/NUMERICS.md): the exported integer
network agrees with the reference executor up to those roundings (an LSB here and there), not bit
for bit: the same top-1 class on 100% of 1,000 CIFAR-10 test images for the shipped ResNet-20 with
the default scheme. Power-of-two scales (targets fpga, matlab) make exact halves common (an add
whose input scales differ by 2x), so there the classes agree less often (98.6% of 500 images).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Union

import numpy as np

from ..ir.graph import Graph
from ..quant import numerics as nx
from ..quant.qgraph import QGraph

OPSET = 17
IR_VERSION = 8            # the IR version of opset 17: any runtime that reads opset 17 reads it
INPUT_NAME = "images"
OUTPUT_NAME = "scores"
_ONNX_DTYPE = {"int8": np.int8, "uint8": np.uint8}
EXPORTED_FLOAT_OPS = ("softmax", "log_softmax", "sigmoid", "tanh", "exp", "hardswish", "hardsigmoid", "leaky_relu",
                      "elu", "mul", "silu", "gelu")


class OnnxExportError(ValueError):
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

    def unique(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c in "_.-/:" else "_" for c in hint) or "t"
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def const(self, hint: str, value: np.ndarray) -> str:
        value = np.array(value, order="C")   # (np.ascontiguousarray would make a scalar 1-d)
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self.consts:
            name = self.unique(hint)
            self.inits.append(self.onnx.numpy_helper.from_array(value, name))
            self.consts[key] = name
        return self.consts[key]

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
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                             producer_name="netquant", doc_string=doc)
        from .. import __version__

        model.producer_version = __version__
        onnx.checker.check_model(model)
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
    ins = [x, "" if lo == -math.inf else b.const(f"{hint}_min", _f32(lo)),
           "" if hi == math.inf else b.const(f"{hint}_max", _f32(hi))]
    while ins[-1] == "":
        ins.pop()
    return b.op("Clip", ins, hint, out)


def _act(b: _Builder, x: str, act, hint: str, out=None) -> str:
    if act is None:
        return x if out is None else b.op("Identity", [x], hint, out)
    lo, hi = act
    return _clamp(b, x, float(lo), float(hi), hint, out)


def _gather(b: _Builder, n, x: str, in_shape: tuple, out=None) -> str:
    index = np.asarray(n.params["index"], dtype=np.int64)
    size = int(np.prod(in_shape))
    target = b.const(f"{n.name}_shape", np.array([0, *n.shape], np.int64))
    if len(index) == size and np.array_equal(index, np.arange(1, size + 1)):   # flatten, view
        return b.op("Reshape", [x, target], n.name, out)
    flat = b.op("Reshape", [x, b.const("flat_shape", np.array([0, -1], np.int64))], f"{n.name}_flat")
    if len(index) and index.min() > 0 and np.array_equal(np.diff(index), np.ones(len(index) - 1, np.int64)):
        start = int(index[0]) - 1                                               # a contiguous slice
        part = b.op("Slice", [flat, b.const(f"{n.name}_start", np.array([start], np.int64)),
                              b.const(f"{n.name}_end", np.array([start + len(index)], np.int64)),
                              b.const("axis1", np.array([1], np.int64))], f"{n.name}_slice")
        return b.op("Reshape", [part, target], n.name, out)
    if (index == 0).any():   # a zero column in front: index 0 reads it, index i reads element i-1
        flat = b.op("Pad", [flat, b.const("pad_one_front", np.array([0, 1, 0, 0], np.int64))], f"{n.name}_pad",
                    mode="constant")
    else:
        index = index - 1
    got = b.op("Gather", [flat, b.const(f"{n.name}_index", index)], f"{n.name}_gather", axis=1)
    return b.op("Reshape", [got, target], n.name, out)


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
    if fn == "gelu":   # torch's exact GELU: x/2 (1 + erf(x/sqrt(2)))
        no_kwargs()
        e = b.op("Erf", [b.op("Mul", [x, b.const("inv_sqrt2", _f32(1 / math.sqrt(2)))], f"{n.name}_scaled")],
                 f"{n.name}_erf")
        one = b.op("Add", [e, b.const("one", _f32(1.0))], f"{n.name}_1p")
        half = b.op("Mul", [x, b.const("half", _f32(0.5))], f"{n.name}_half")
        return b.op("Mul", [half, one], n.name, out)
    raise OnnxExportError(f"node {n.name!r}: float op {fn!r} has no ONNX export (exported float ops: "
                          f"{', '.join(EXPORTED_FLOAT_OPS)})")


def _pool_attrs(a: dict) -> dict:
    ph, pw = a["padding"]
    return {"kernel_shape": list(a["kernel"]), "strides": list(a["stride"]), "pads": [ph, pw, ph, pw]}


def _compute(b: _Builder, n, xs: list, in_shapes: list, weights: Optional[tuple] = None, out=None,
             with_act: bool = True) -> str:
    """The float computation of node ``n`` (a Node, or a QNode of the same op) on ONNX tensors
    ``xs`` (their per-image shapes ``in_shapes``). ``weights``: (weight, bias) tensor names that
    replace the node's float params (the dequantized int8 weights of the QDQ form)."""
    a = n.attrs
    if n.op in ("conv", "linear"):
        if weights is None:
            weights = (b.const(f"{n.name}_weight", _f32(n.params["weight"])),
                       b.const(f"{n.name}_bias", _f32(n.params["bias"])))
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
    if n.op == "add":
        act = a.get("act") if with_act else None
        y = b.op("Add", xs, n.name if act is None else f"{n.name}_add", None if act is not None else out)
        return y if act is None else _act(b, y, act, n.name, out)
    if n.op == "concat":
        return b.op("Concat", xs, n.name, out, axis=1)
    if n.op == "gather":
        return _gather(b, n, xs[0], in_shapes[0], out)
    if n.op == "maxpool":
        return b.op("MaxPool", xs, n.name, out, **_pool_attrs(a))
    if n.op == "avgpool":
        return b.op("AveragePool", xs, n.name, out, count_include_pad=1, **_pool_attrs(a))
    if n.op == "affine":
        rank = len(in_shapes[0]) + 1
        y = b.op("Mul", [xs[0], b.const(f"{n.name}_scale", _per_channel_shape(_f32(n.params["scale"]), rank))],
                 f"{n.name}_mul")
        return b.op("Add", [y, b.const(f"{n.name}_shift", _per_channel_shape(_f32(n.params["shift"]), rank))],
                    n.name, out)
    if n.op == "act":
        return _act(b, xs[0], a["act"], n.name, out) if with_act else xs[0]
    if n.op == "float":
        return _float_op(b, n, xs, out)
    raise OnnxExportError(f"node {n.name!r}: op {n.op!r} has no ONNX export")


def _write(model, path) -> None:
    data = model.SerializeToString()
    with open(os.fspath(path), "wb") as f:
        f.write(data)


# --- float network --------------------------------------------------------------------------

def float_onnx(graph: Graph):
    """The float Graph as an ``onnx.ModelProto`` (see the module docstring)."""
    b = _Builder()
    tensors: dict = {}
    shapes = {n.name: n.shape for n in graph.nodes}
    for n in graph.nodes:
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

    def qparams(n) -> tuple[str, str]:
        if n.dtype not in _ONNX_DTYPE:
            raise OnnxExportError(f"node {n.name!r}: integer type {n.dtype!r} has no QDQ export")
        return (b.const(f"{n.name}_scale", _f32(n.scale)),
                b.const(f"zero_{n.dtype}", np.zeros((), _ONNX_DTYPE[n.dtype])))

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
        wq = np.asarray(n.params["weight"], np.int8)
        bq = np.asarray(n.params["bias"], np.int32)
        w = b.op("DequantizeLinear", [b.const(f"{n.name}_weight_int8", wq),
                                      b.const(f"{n.name}_weight_scale", _f32(s_w)),
                                      b.const(f"zero_int8_x{o}", np.zeros(o, np.int8))],
                 f"{n.name}_weight", axis=0)
        bias = b.op("DequantizeLinear", [b.const(f"{n.name}_bias_int32", bq),
                                         b.const(f"{n.name}_bias_scale", _f32(x.scale * s_w)),
                                         b.const(f"zero_int32_x{o}", np.zeros(o, np.int32))],
                    f"{n.name}_bias", axis=0)
        return w, bias

    for n in q.nodes:
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
            weights = int_weights(n) if n.op in ("conv", "linear") else None
            y = _compute(b, n, xs, [nodes[i].shape for i in n.inputs], weights=weights, with_act=False)
        to_int(n, y)
        if out is not None:   # an integer output: give its float value
            b.op("Identity", [fl[n.name]], "output", out)
    return b.model(nodes[q.input].shape, nodes[q.output].shape, "netquant int8 network (QDQ)")


def export_quantized_onnx(qnet_or_qgraph: Union[QGraph, object], path) -> "onnx.ModelProto":
    """Write the integer network (a QuantizedNetwork, its QGraph, or a calibrated Quantizer) to
    ``path`` as ONNX in QDQ form (see the module docstring). Returns the ``onnx.ModelProto``."""
    model = quantized_onnx(qnet_or_qgraph)
    _write(model, path)
    return model
