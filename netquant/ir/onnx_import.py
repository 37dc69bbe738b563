"""Import an ONNX image classifier into netquant's :class:`~netquant.ir.graph.Graph`.

``import_onnx("net.onnx")`` reads the protobuf (never a pickle), walks the nodes in topological
order and keeps, for every ONNX tensor, either a constant (numpy) or the IR node that carries it
with its concrete shape (batch first). Everything that does not depend on the input is folded
into constants by running the node in ``onnx.reference`` (``Shape -> Gather -> Concat -> Reshape``
chains become a constant target shape); ``Shape`` of an activation is its known shape.

Ops on activations map to IR nodes as capture does for torch (``netquant/ir/capture.py``): Conv,
Gemm and MatMul with constant weights -> conv/linear; BatchNormalization and Add/Sub/Mul/Div by
per-channel constants -> affine (y = x*scale[c] + shift[c]; e.g. ``(x - 0.5) / 0.25`` is scale 4,
shift -2); Relu/Clip/Min/Max by a scalar -> act (lo, hi); Sigmoid, HardSwish, Softmax, bilinear
Resize, ... -> float ops. Pure data movement (Reshape, Transpose, Flatten, Slice, Split,
Squeeze, Unsqueeze, Pad with zeros, Expand, Tile, DepthToSpace, nearest Resize, Gather with
constant indices) is replayed on element numbers 1..n, so the gather index is exact whatever the
exporter wrote: replaying ``Transpose(perm=[0, 1, 3, 2])`` on a 1x2x2 image numbered
[[1, 2], [3, 4]] gives [[1, 3], [2, 4]], the index (1, 3, 2, 4).

Node names become C identifiers (codegen uses them as symbols): the torch exporter's
``/layer1/layer1.0/conv1/Conv`` becomes ``layer1_0_conv1`` (the scope path, with the op type
dropped where that is unambiguous); ``layers`` keeps the original ONNX node name, which is what
the calibration table shows. The result is optimized like a capture (batch norm folded, ReLU
fused) and, with ``check=True``, run against onnxruntime on a random batch.

Not representable (a clear OnnxImportError naming the node): ops with no netquant equivalent
(Erf, so GELU as torch writes it before opset 20; PRelu; QuantizeLinear on activations),
average pooling that excludes pads or whose ceil-mode windows run past them, concatenation
along other dims than channels, several inputs or outputs. Bilinear Resize by a scale whose
output size is not an integer multiple maps pixels differently in torch's ``interpolate(size=)``;
the self-check reports it.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import NetquantError
from .float_ops import FLOAT_FNS
from .graph import Graph, Node, rename_inputs
from .passes import optimize

log = logging.getLogger(__name__)

INF = math.inf
FLT_MAX = float(np.finfo(np.float32).max)
CHECK_RTOL = 1e-4   # self-check: max |onnxruntime - netquant| <= 1e-4 * max |onnxruntime| (+1e-6)


class OnnxImportError(NetquantError, ValueError):
    """The ONNX model holds something netquant cannot represent; the message names the node."""


@dataclass(frozen=True)
class _Dyn:
    """An activation: the IR node that computes it and its full shape, batch first."""

    name: str
    shape: tuple


# ops that only move elements: replayed on element numbers (input 0 is the activation)
_MOVES = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Pad", "Expand",
          "Tile", "DepthToSpace", "SpaceToDepth", "Gather")
_ALIAS = ("Identity", "Dropout", "Cast", "CastLike")
_FLOAT_UNARY = {"Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hardswish", "Exp": "exp"}


def _onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - onnx is in the [onnx] extra
        raise OnnxImportError("importing ONNX needs the onnx package: pip install 'netquant[onnx]'") from e
    return onnx


# --- loading ----------------------------------------------------------------------------------
def _load(source):
    """(ModelProto, default name) from a path, bytes or a ModelProto."""
    onnx = _onnx()
    from google.protobuf.message import DecodeError

    if isinstance(source, onnx.ModelProto):
        return source, source.graph.name or "onnx"
    if isinstance(source, (bytes, bytearray, memoryview)):
        try:
            return onnx.load_model_from_string(bytes(source)), None
        except (DecodeError, ValueError) as e:
            raise OnnxImportError(f"the bytes given are not an ONNX model: {e}") from e
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise OnnxImportError(f"ONNX file {str(path)!r} does not exist")
        try:
            # onnx.load parses the protobuf and reads external weight files next to it
            return onnx.load(str(path)), path.stem
        except (DecodeError, ValueError, OSError) as e:
            raise OnnxImportError(f"{str(path)!r} is not a readable ONNX model: {e}") from e
    raise OnnxImportError(f"import_onnx: source must be a path, bytes or onnx.ModelProto, "
                          f"got {type(source).__name__}")


# --- names ------------------------------------------------------------------------------------
def c_ident(name: str) -> str:
    """A C identifier: 'layer1.0.conv1' -> 'layer1_0_conv1', '0.weight' -> 'l_0_weight'."""
    s = re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_") or "node"
    s = re.sub(r"_+", "_", s)
    return s if re.match(r"[A-Za-z_]", s) else f"l_{s}"


def _scope_path(node) -> tuple[list, Optional[str]]:
    """(module scopes, op tail) of a node. The torch exporter writes the scope path into the
    name: ``/layer1/layer1.0/conv1/Conv`` -> (['layer1.0', 'conv1'], 'Conv'); the dynamo exporter
    writes it into the ``namespace`` metadata (': Net/layer1: Sequential/layer1.0: Block/add:
    aten.add.Tensor' -> (['layer1.0'], 'add')). A plain name has no tail."""
    for p in node.metadata_props:
        if p.key == "namespace" and "/" in p.value:
            segs = [s.split(":")[0].strip() for s in p.value.split("/")]
            segs = [s for s in segs if s]
            if segs:
                return _collapse(segs[:-1]), segs[-1]
    raw = node.name or (node.output[0] if node.output else "")
    parts = [p for p in raw.split("/") if p]
    if parts and "/" in raw and re.fullmatch(rf"{re.escape(node.op_type)}(_\d+)?", parts[-1]):
        return _collapse(parts[:-1]), parts[-1]
    return [raw] if raw else [], None


def _collapse(parts: list) -> list:
    """['layer1', 'layer1.0', 'conv1'] -> ['layer1.0', 'conv1'] (torch repeats the full path of
    nested modules)."""
    out: list = []
    for p in parts:
        if out and p.startswith(out[-1] + "."):
            out[-1] = p
        else:
            out.append(p)
    return out


def _stem(tail: str) -> str:
    return re.sub(r"_\d+$", "", tail).lower()


def _base_names(nodes) -> list[str]:
    """One short name per node: its module path, where that is unambiguous. A path that holds
    other layers (a residual block's Add) gets the op: layer1_0_add; a module called several times
    (one ReLU module applied twice) gets a count: layer1_0_relu, layer1_0_relu_1; several ops
    inside one leaf module get their ops: se_mul, se_add."""
    paths, tails = [], []
    for i, n in enumerate(nodes):
        scopes, tail = _scope_path(n)
        paths.append(".".join(scopes))
        tails.append(tail or f"{n.op_type}_{i}")
    groups: dict = {}
    for k, p in enumerate(paths):
        groups.setdefault(p, []).append(k)
    containers = set()
    for p in paths:
        pieces = p.split(".")
        containers.update(".".join(pieces[:j]) for j in range(1, len(pieces)))
    out = [""] * len(nodes)
    for p, members in groups.items():
        if not p:
            for k in members:
                out[k] = tails[k].lower()
        elif p in containers or (len(members) > 1 and len({_stem(tails[k]) for k in members}) > 1):
            for k in members:
                out[k] = f"{p}.{tails[k].lower()}"
        else:
            for j, k in enumerate(members):
                out[k] = p if j == 0 else f"{p}_{j}"
    return [c_ident(s) for s in out]


# --- the importer -----------------------------------------------------------------------------
class _Importer:
    def __init__(self, model, input_shape):
        self.onnx = _onnx()
        from onnx import numpy_helper

        self.model = model
        g = model.graph
        self.opsets = {(o.domain or ""): o.version for o in model.opset_import}
        self.opset = self.opsets.get("", self.opsets.get("ai.onnx", 0))
        if self.opset and self.opset < 11:
            log.warning("ONNX opset %d is older than 11; importing anyway", self.opset)
        self.consts: dict = {}
        for t in g.initializer:
            self.consts[t.name] = numpy_helper.to_array(t)
        self.dyn: dict = {}
        self.nodes: list[Node] = []
        self.used: set = set()
        self.layer_short: dict = {}   # ONNX node name -> IR name of its main node

        inputs = [i for i in g.input if i.name not in self.consts]  # initializers as inputs: constants
        if len(inputs) != 1:
            raise OnnxImportError(f"the ONNX model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                                  "netquant imports image classifiers with exactly one input")
        if len(g.output) != 1:
            raise OnnxImportError(f"the ONNX model has {len(g.output)} outputs "
                                  f"({', '.join(o.name for o in g.output)}); netquant needs exactly one")
        self.input_info = inp = inputs[0]
        self.output_name = g.output[0].name
        self.batch, self.in_shape, self.nhwc = self._input_shape(inp, input_shape)
        name = self.unique(c_ident(inp.name))
        self.nodes.append(Node(name, "input", (), self.in_shape, {}, {}, (inp.name,)))
        self.dyn[inp.name] = _Dyn(name, (self.batch,) + self.in_shape)
        if self.nhwc:
            # netquant images are NCHW: the model's NHWC input is a transpose of them (an exact
            # gather; the model's own Transpose back to NCHW then merges with it into nothing)
            c, h, w = self.in_shape
            ids, size = self.ids(self.dyn[inp.name])
            index = ids[0].transpose(1, 2, 0).reshape(-1).astype(np.int64)
            gname = self.unique(f"{name}_nhwc")
            self.nodes.append(Node(gname, "gather", (name,), (h, w, c), {}, {"index": index}, (inp.name,)))
            self.dyn[inp.name] = _Dyn(gname, (self.batch, h, w, c))
            log.info("input %r is NHWC %s: netquant gives it NCHW images of shape %s", inp.name, (h, w, c),
                     self.in_shape)

    # --- input -------------------------------------------------------------------------------
    def _input_shape(self, inp, override):
        tt = inp.type.tensor_type
        if tt.elem_type != self.onnx.TensorProto.FLOAT:
            got = self.onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type else "no tensor type"
            raise OnnxImportError(f"input {inp.name!r} has element type {got}; netquant needs a float32 input")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim] \
            if tt.HasField("shape") else None
        if dims is not None and len(dims) != 4:
            raise OnnxImportError(f"input {inp.name!r} has rank {len(dims)} (shape {_fmt(dims)}); "
                                  "netquant needs NCHW images (batch, channels, height, width)")
        # channels last (TensorFlow exports): 3 channels last and not first (an RGB image 3
        # pixels wide in NCHW is not a thing); grayscale stays ambiguous, so NCHW
        nhwc = dims is not None and dims[3] == 3 and dims[1] != 3
        model_dims = dims
        if nhwc:
            dims = [dims[0], dims[3], dims[1], dims[2]]
        if override is not None:
            override = tuple(int(v) for v in override)
            if len(override) != 3 or min(override) <= 0:
                raise OnnxImportError(f"input_shape must be (C, H, W) with positive sizes, got {override}")
            if dims is not None:
                for have, want, what in zip(dims[1:], override, ("channels", "height", "width")):
                    if have is not None and have != want:
                        raise OnnxImportError(f"input_shape {override} disagrees with the model: input "
                                              f"{inp.name!r} has {what} {have} (shape {_fmt(model_dims)})")
            chw = override
        else:
            if dims is None or any(d is None for d in dims[1:]):
                raise OnnxImportError(f"input {inp.name!r} has no static (C, H, W) (shape "
                                      f"{_fmt(model_dims) if dims is not None else 'unknown'}); pass "
                                      "input_shape=(C, H, W), e.g. input_shape=(3, 224, 224)")
            chw = tuple(dims[1:])
        # a static batch is what the model's constant shapes assume (Reshape to [1, -1]); a
        # symbolic one is replayed with 2 images, so data movement that mixes images is caught
        batch = dims[0] if dims is not None and dims[0] is not None else 2
        return batch, chw, nhwc

    # --- helpers -----------------------------------------------------------------------------
    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name = f"{base}_{k}"
            k += 1
        self.used.add(name)
        return name

    def fail(self, node, what: str):
        raise OnnxImportError(f"cannot import ONNX node {node.name or node.output[0]!r} ({node.op_type}): {what}")

    def attr(self, node, key, default=None):
        for a in node.attribute:
            if a.name == key:
                return self.onnx.helper.get_attribute_value(a)
        return default

    def emit(self, node, op, inputs, shape, attrs=None, params=None, suffix="", main=True) -> _Dyn:
        """Add an IR node for ONNX ``node``; ``shape`` is per image (no batch)."""
        base = self.short.get(id(node)) or c_ident(node.name or node.output[0])
        name = self.unique(f"{base}_{suffix}" if suffix else base)
        layer = node.name or node.output[0]
        params = {k: (v if v.dtype == np.int64 else np.ascontiguousarray(v, dtype=np.float32))
                  for k, v in (params or {}).items()}
        self.nodes.append(Node(name, op, tuple(inputs), tuple(int(s) for s in shape), dict(attrs or {}),
                               params, (layer,)))
        if main:
            self.layer_short[layer] = name
        return _Dyn(name, (self.batch,) + tuple(int(s) for s in shape))

    def reference(self, node, values):
        """Run ``node`` in onnx.reference on numpy ``values`` (one per input, None = absent)."""
        from onnx.reference import ReferenceEvaluator

        helper = self.onnx.helper
        feeds = {n: v for n, v in zip(node.input, values) if n and v is not None}
        # a one-node model, so the node runs in the model's opset (a bare NodeProto runs in the
        # newest one: Unsqueeze's axes moved from an attribute to an input in opset 13)
        info = lambda n: helper.make_tensor_value_info(n, self.onnx.TensorProto.UNDEFINED, None)  # noqa: E731
        graph = helper.make_graph([node], "node", [info(n) for n in feeds], [info(o) for o in node.output if o])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets.items()])
        try:
            outs = iter(ReferenceEvaluator(model).run(None, feeds))
            return [next(outs) if o else None for o in node.output]
        except Exception as e:   # the reference raises anything from NotImplementedError to IndexError
            self.fail(node, f"evaluating it failed: {type(e).__name__}: {e}")

    # --- data movement ----------------------------------------------------------------------
    def ids(self, x: _Dyn) -> tuple[np.ndarray, int]:
        """Element numbers of ``x``: image b holds b*size+1 .. (b+1)*size (float64, exact)."""
        size = int(np.prod(x.shape[1:]))
        return np.arange(1, self.batch * size + 1, dtype=np.float64).reshape(x.shape), size

    def to_index(self, node, out, size) -> np.ndarray:
        out = np.asarray(out)
        if out.ndim == 0 or out.shape[0] != self.batch:
            self.fail(node, f"data movement changes the batch dimension (shape {_fmt(out.shape)}, "
                            f"batch {self.batch})")
        if not (np.all(out == np.round(out)) and out.min(initial=0) >= 0 and out.max(initial=0) <= self.batch * size):
            self.fail(node, "the op computes new values (it is not pure data movement)")
        first = out[0].reshape(-1)
        for b in range(1, self.batch):
            if not np.array_equal(np.where(first > 0, first + b * size, 0), out[b].reshape(-1)):
                self.fail(node, "data movement mixes images of a batch")
        return first.astype(np.int64)

    def gather_fn(self, node, x: _Dyn, fn, suffix="", main=True) -> _Dyn:
        """A gather computed by applying numpy ``fn`` to the element numbers of ``x``."""
        ids, size = self.ids(x)
        out = fn(ids)
        return self.emit(node, "gather", [x.name], out.shape[1:], params={"index": self.to_index(node, out, size)},
                         suffix=suffix, main=main)

    def replay(self, node, ins):
        x = ins[0]
        if any(isinstance(v, _Dyn) for v in ins[1:]):
            self.fail(node, "data movement whose shape, indices or pads depend on the input activation")
        if node.op_type == "Pad":
            mode = self.attr(node, "mode", b"constant")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            value = ins[2] if len(ins) > 2 and ins[2] is not None else self.attr(node, "value", 0.0)
            if mode != "constant" or np.any(np.asarray(value) != 0):
                self.fail(node, f"only zero padding is supported (mode {mode!r}, value {np.asarray(value).tolist()})")
        ids, size = self.ids(x)
        outs = self.reference(node, [ids] + list(ins[1:]))
        many = len([o for o in node.output if o]) > 1
        res = []
        for k, (oname, out) in enumerate(zip(node.output, outs)):
            if not oname:
                res.append(None)
                continue
            res.append(self.emit(node, "gather", [x.name], np.asarray(out).shape[1:],
                                 params={"index": self.to_index(node, out, size)},
                                 suffix=str(k) if many else ""))
        return res

    # --- weighted layers ---------------------------------------------------------------------
    def pads(self, node, spatial, kernel, strides, dilations):
        """(begin pads, end pads) per spatial dim, from ``pads`` or ``auto_pad``."""
        auto = self.attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        n = len(spatial)
        if auto in ("NOTSET", ""):
            p = list(self.attr(node, "pads", [0] * 2 * n))
            return p[:n], p[n:]
        if auto == "VALID":
            return [0] * n, [0] * n
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for size, k, s, d in zip(spatial, kernel, strides, dilations):
                out = -(-size // s)
                total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
                small, big = total // 2, total - total // 2
                begin.append(small if auto == "SAME_UPPER" else big)
                end.append(big if auto == "SAME_UPPER" else small)
            return begin, end
        self.fail(node, f"auto_pad {auto!r}")

    def need4(self, node, x):
        if not isinstance(x, _Dyn) or len(x.shape) != 4:
            got = _fmt(x.shape) if isinstance(x, _Dyn) else "a constant"
            self.fail(node, f"expected an NCHW activation, got {got}")

    def const_input(self, node, v, what):
        if isinstance(v, _Dyn):
            self.fail(node, f"{what} computed from the input activation (only constant {what}s)")
        if v is None:
            self.fail(node, f"missing {what}")
        return np.asarray(v, dtype=np.float64)

    def zero_pad(self, node, x: _Dyn, begin, end) -> _Dyn:
        widths = ((0, 0), (0, 0)) + tuple(zip(begin, end))
        return self.gather_fn(node, x, lambda ids: np.pad(ids, widths), suffix="pad", main=False)

    def op_Conv(self, node, ins):
        x = ins[0]
        self.need4(node, x)
        w = self.const_input(node, ins[1], "weight")
        b = ins[2] if len(ins) > 2 and ins[2] is not None else np.zeros(w.shape[0])
        b = self.const_input(node, b, "bias")
        if w.ndim != 4:
            self.fail(node, f"weight of rank {w.ndim} (only 2-D convolutions)")
        groups = int(self.attr(node, "group", 1))
        k = tuple(w.shape[2:])
        strides = tuple(self.attr(node, "strides", [1, 1]))
        dil = tuple(self.attr(node, "dilations", [1, 1]))
        c = x.shape[1]
        if w.shape[1] * groups != c or w.shape[0] % groups:
            self.fail(node, f"weight {_fmt(w.shape)} with group {groups} does not fit {c} input channels")
        begin, end = self.pads(node, x.shape[2:], k, strides, dil)
        if list(begin) != list(end):   # asymmetric (SAME_UPPER, TF exports): explicit zero pad first
            x = self.zero_pad(node, x, begin, end)
            begin = end = [0, 0]
        h, wd = x.shape[2:]
        oh = (h + 2 * begin[0] - dil[0] * (k[0] - 1) - 1) // strides[0] + 1
        ow = (wd + 2 * begin[1] - dil[1] * (k[1] - 1) - 1) // strides[1] + 1
        return [self.emit(node, "conv", [x.name], (w.shape[0], oh, ow),
                          {"stride": strides, "padding": tuple(begin), "dilation": dil, "groups": groups,
                           "act": None}, {"weight": w, "bias": b})]

    def linear(self, node, x, weight, bias):
        if not isinstance(x, _Dyn) or len(x.shape) != 2:
            self.fail(node, f"a fully connected layer needs a (batch, features) activation, got "
                            f"{_fmt(x.shape) if isinstance(x, _Dyn) else 'a constant'}")
        if weight.ndim != 2 or weight.shape[1] != x.shape[1]:
            self.fail(node, f"weight {_fmt(weight.shape)} does not fit {x.shape[1]} input features")
        return self.emit(node, "linear", [x.name], (weight.shape[0],), {"act": None}, {"weight": weight, "bias": bias})

    def op_Gemm(self, node, ins):
        a, bm = ins[0], ins[1]
        if not isinstance(a, _Dyn):
            self.fail(node, "the activation must be input A (a constant A times an activation B is not a layer)")
        if self.attr(node, "transA", 0):
            self.fail(node, "transA=1 on the activation (its batch would be the reduced dimension)")
        bm = self.const_input(node, bm, "weight")
        alpha, beta = float(self.attr(node, "alpha", 1.0)), float(self.attr(node, "beta", 1.0))
        wt = bm if self.attr(node, "transB", 0) else bm.T   # (O, K)
        c = ins[2] if len(ins) > 2 and ins[2] is not None else np.zeros(wt.shape[0])
        c = self.const_input(node, c, "bias")
        if c.ndim == 2:
            if not np.all(c == c[:1]):
                self.fail(node, f"bias C of shape {_fmt(c.shape)} differs between rows (images)")
            c = c[0]
        try:
            bias = np.broadcast_to(c, (wt.shape[0],))
        except ValueError:
            self.fail(node, f"bias C of shape {_fmt(c.shape)} does not broadcast to {wt.shape[0]} outputs")
        return [self.linear(node, a, alpha * wt, beta * bias)]

    def op_MatMul(self, node, ins):
        a, bm = ins
        if isinstance(a, _Dyn) and isinstance(bm, _Dyn):
            self.fail(node, "MatMul of two activations (only an activation times a constant weight)")
        if not isinstance(a, _Dyn):
            self.fail(node, "a constant times an activation (only an activation times a constant weight)")
        bm = self.const_input(node, bm, "weight")
        if bm.ndim != 2:
            self.fail(node, f"weight of rank {bm.ndim} (only a 2-D weight matrix)")
        return [self.linear(node, a, bm.T, np.zeros(bm.shape[1]))]

    # --- elementwise ------------------------------------------------------------------------
    def per_channel(self, node, x: _Dyn, c) -> np.ndarray:
        """The per-channel values (C,) of constant ``c`` broadcast against ``x``."""
        c = np.asarray(c, dtype=np.float64)
        if len(x.shape) < 2:
            self.fail(node, f"activation of shape {_fmt(x.shape)} has no channel dimension")
        try:
            full = np.broadcast_shapes(x.shape, c.shape)
        except ValueError:
            self.fail(node, f"constant of shape {_fmt(c.shape)} does not broadcast to {_fmt(x.shape)}")
        if tuple(full) != tuple(x.shape):
            self.fail(node, f"constant of shape {_fmt(c.shape)} would enlarge the activation {_fmt(x.shape)}")
        c = c.reshape((1,) * (len(x.shape) - c.ndim) + c.shape)
        if c.shape[0] != 1 and not np.all(c == c[:1]):
            self.fail(node, "a constant operand that differs between images")
        per = np.broadcast_to(c[:1], (1,) + tuple(x.shape[1:])).reshape(x.shape[1], -1)
        if not np.all(per == per[:, :1]):
            self.fail(node, "a constant operand that varies over space (only per-channel constants)")
        return per[:, 0]

    def affine(self, node, x: _Dyn, scale, shift, suffix="", main=True) -> _Dyn:
        ch = x.shape[1]
        return self.emit(node, "affine", [x.name], x.shape[1:], {},
                         {"scale": np.broadcast_to(scale, (ch,)), "shift": np.broadcast_to(shift, (ch,))},
                         suffix=suffix, main=main)

    def expand_to(self, node, x: _Dyn, shape, suffix) -> _Dyn:
        if tuple(x.shape) == tuple(shape):
            return x
        return self.gather_fn(node, x, lambda ids: np.broadcast_to(ids, shape), suffix=suffix, main=False)

    def binary(self, node, ins, kind):
        a, b = ins[0], ins[1]
        if isinstance(a, _Dyn) and isinstance(b, _Dyn):
            try:
                shape = tuple(np.broadcast_shapes(a.shape, b.shape))
            except ValueError:
                self.fail(node, f"activations of shapes {_fmt(a.shape)} and {_fmt(b.shape)} do not broadcast")
            if kind == "mul":
                return [self.emit(node, "float", [a.name, b.name], shape[1:], {"fn": "mul", "kwargs": {}})]
            if kind == "div":
                self.fail(node, "division of two activations is not supported")
            a, b = self.expand_to(node, a, shape, "expand0"), self.expand_to(node, b, shape, "expand1")
            if kind == "sub":   # a - b = a + (-1) * b
                b = self.affine(node, b, -1.0, 0.0, suffix="neg", main=False)
            return [self.emit(node, "add", [a.name, b.name], shape[1:], {"act": None})]
        if isinstance(a, _Dyn):
            v = self.per_channel(node, a, b)
            one, zero = np.ones_like(v), np.zeros_like(v)
            scale, shift = {"add": (one, v), "sub": (one, -v), "mul": (v, zero), "div": (1 / v, zero)}[kind]
            return [self.affine(node, a, scale, shift)]
        v = self.per_channel(node, b, a)
        if kind == "div":
            self.fail(node, "a constant divided by an activation is not supported")
        one, zero = np.ones_like(v), np.zeros_like(v)
        scale, shift = {"add": (one, v), "sub": (-one, v), "mul": (v, zero)}[kind]
        return [self.affine(node, b, scale, shift)]

    def op_Add(self, node, ins):
        return self.binary(node, ins, "add")

    def op_Sub(self, node, ins):
        return self.binary(node, ins, "sub")

    def op_Mul(self, node, ins):
        return self.binary(node, ins, "mul")

    def op_Div(self, node, ins):
        return self.binary(node, ins, "div")

    def op_Sum(self, node, ins):
        if len(ins) == 1:
            return [ins[0]]
        out = ins[0]
        for k, other in enumerate(ins[1:]):
            if not (isinstance(out, _Dyn) and isinstance(other, _Dyn)):
                self.fail(node, "Sum with constant operands")
            if out.shape != other.shape:
                self.fail(node, f"Sum of shapes {_fmt(out.shape)} and {_fmt(other.shape)}")
            last = k == len(ins) - 2
            out = self.emit(node, "add", [out.name, other.name], out.shape[1:], {"act": None},
                            suffix="" if last else f"sum{k}", main=last)
        return [out]

    def op_Neg(self, node, ins):
        return [self.affine(node, ins[0], -1.0, 0.0)]

    def op_BatchNormalization(self, node, ins):
        x = ins[0]
        if self.attr(node, "training_mode", 0):
            self.fail(node, "training_mode=1 (export the model in eval mode)")
        if len(x.shape) < 2:
            self.fail(node, f"activation of shape {_fmt(x.shape)}")
        gamma, beta, mean, var = (self.const_input(node, v, what) for v, what in
                                  zip(ins[1:5], ("scale", "bias", "mean", "variance")))
        eps = float(self.attr(node, "epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        return [self.affine(node, x, scale, beta - mean * scale)]

    # --- activations -------------------------------------------------------------------------
    def act(self, node, x, lo, hi, **kw) -> _Dyn:
        lo = -INF if lo is None or lo <= -FLT_MAX else float(lo)
        hi = INF if hi is None or hi >= FLT_MAX else float(hi)
        return self.emit(node, "act", [x.name], x.shape[1:], {"act": (lo, hi)}, **kw)

    def scalar(self, node, v, what):
        if v is None:
            return None
        v = self.const_input(node, v, what)
        if v.size != 1:
            self.fail(node, f"{what} of shape {_fmt(v.shape)} (only a scalar)")
        return float(v.reshape(-1)[0])

    def op_Relu(self, node, ins):
        return [self.act(node, ins[0], 0.0, INF)]

    def op_Clip(self, node, ins):
        if self.opset >= 11:
            lo = self.scalar(node, ins[1] if len(ins) > 1 else None, "min")
            hi = self.scalar(node, ins[2] if len(ins) > 2 else None, "max")
        else:
            lo, hi = self.attr(node, "min", None), self.attr(node, "max", None)
        return [self.act(node, ins[0], lo, hi)]

    def op_Max(self, node, ins):
        return self.minmax(node, ins, "max")

    def op_Min(self, node, ins):
        return self.minmax(node, ins, "min")

    def minmax(self, node, ins, kind):
        dyn = [v for v in ins if isinstance(v, _Dyn)]
        if len(ins) != 2 or len(dyn) != 1:
            self.fail(node, f"{kind.capitalize()} of an activation and one scalar constant only")
        c = self.scalar(node, ins[1] if dyn[0] is ins[0] else ins[0], "constant")
        return [self.act(node, dyn[0], c, None) if kind == "max" else self.act(node, dyn[0], None, c)]

    def float_op(self, node, x, fn, shape=None, **kwargs):
        if fn not in FLOAT_FNS:
            self.fail(node, f"netquant has no float implementation of {fn!r} (float ops: {', '.join(FLOAT_FNS)})")
        return self.emit(node, "float", [x.name], x.shape[1:] if shape is None else shape, {"fn": fn, "kwargs": kwargs})

    def op_LeakyRelu(self, node, ins):
        return [self.float_op(node, ins[0], "leaky_relu", negative_slope=float(self.attr(node, "alpha", 0.01)))]

    def op_Elu(self, node, ins):
        return [self.float_op(node, ins[0], "elu", alpha=float(self.attr(node, "alpha", 1.0)))]

    def op_Gelu(self, node, ins):
        approx = self.attr(node, "approximate", b"none")
        if (approx.decode() if isinstance(approx, bytes) else approx) != "none":
            self.fail(node, "Gelu with the tanh approximation")
        return [self.float_op(node, ins[0], "gelu")]

    def op_HardSigmoid(self, node, ins):
        alpha, beta = float(self.attr(node, "alpha", 0.2)), float(self.attr(node, "beta", 0.5))
        x = ins[0]
        if abs(alpha - 1 / 6) < 1e-7 and beta == 0.5:   # torch's hardsigmoid: relu6(x + 3) / 6
            return [self.float_op(node, x, "hardsigmoid")]
        # max(0, min(1, alpha*x + beta)): an affine then a clamp, both exact
        y = self.affine(node, x, alpha, beta, suffix="affine", main=False)
        return [self.act(node, y, 0.0, 1.0)]

    def op_Softmax(self, node, ins):
        return [self.softmax(node, ins[0], "softmax")]

    def op_LogSoftmax(self, node, ins):
        return [self.softmax(node, ins[0], "log_softmax")]

    def softmax(self, node, x, fn):
        rank = len(x.shape)
        axis = int(self.attr(node, "axis", 1 if self.opset < 13 else -1)) % rank
        if self.opset < 13 and int(np.prod(x.shape[axis + 1:])) != 1:
            # before opset 13, softmax runs over all dims from axis on, flattened
            self.fail(node, f"softmax over the flattened dims {axis}.. of {_fmt(x.shape)} (opset {self.opset})")
        if axis == 0:
            self.fail(node, "softmax over the batch dimension")
        return self.float_op(node, x, fn, dim=axis)

    # --- pooling -----------------------------------------------------------------------------
    def pool(self, node, x, kind, kernel, stride, padding, shape, **kw) -> _Dyn:
        return self.emit(node, kind, [x.name], shape, {"kernel": tuple(kernel), "stride": tuple(stride),
                                                       "padding": tuple(padding)}, **kw)

    def op_MaxPool(self, node, ins):
        return self.onnx_pool(node, ins[0], "maxpool")

    def op_AveragePool(self, node, ins):
        return self.onnx_pool(node, ins[0], "avgpool")

    def onnx_pool(self, node, x, kind):
        self.need4(node, x)
        k = tuple(self.attr(node, "kernel_shape"))
        s = tuple(self.attr(node, "strides", [1] * len(k)))
        if len(k) != 2 or tuple(self.attr(node, "dilations", [1, 1])) != (1, 1):
            self.fail(node, f"pooling with kernel {k} and dilations (only 2-D, dilation 1)")
        begin, end = self.pads(node, x.shape[2:], k, s, (1, 1))
        ceil = bool(self.attr(node, "ceil_mode", 0))
        out, end_used = [], []
        for size, kk, ss, b, e in zip(x.shape[2:], k, s, begin, end):
            span = size + b + e - kk
            o = (-(-span // ss) if ceil else span // ss) + 1
            if ceil and (o - 1) * ss >= size + b:   # the last window must start inside the image
                o -= 1
            out.append(o)
            end_used.append((o - 1) * ss + kk - size - b)
        # torch pools (the float executor) take symmetric pads of at most half the kernel
        plain = list(begin) == list(end) and all(o == (sz + 2 * b - kk) // ss + 1 and b <= kk // 2
                                                  for o, sz, b, kk, ss in zip(out, x.shape[2:], begin, k, s))
        c = x.shape[1]
        if kind == "avgpool":
            include = bool(self.attr(node, "count_include_pad", 0))
            if not include and any(begin + end):
                self.fail(node, "average pooling with count_include_pad=0 over padding")
            if not plain and any(eu > e for eu, e in zip(end_used, end)):
                self.fail(node, "average pooling with ceil_mode windows past the padding")
            if plain:
                return [self.pool(node, x, kind, k, s, begin, (c, *out))]
            # pads counted as zeros (count_include_pad=1): pad explicitly, up to the last window
            x = self.zero_pad(node, x, begin, [max(eu, 0) for eu in end_used])
            return [self.pool(node, x, kind, k, s, (0, 0), (c, *out))]
        if plain:
            return [self.pool(node, x, kind, k, s, begin, (c, *out))]
        # asymmetric or ceil-mode max pooling: a stride-1 pool with padding p = max(begin, end)
        # (padding never wins a max), then keep output j = o*s + p - begin of each dim
        p = [max(b, e) for b, e in zip(begin, end_used)]
        if any(pp > kk // 2 for pp, kk in zip(p, k)):
            self.fail(node, f"max pooling pads {begin}+{end} larger than half the kernel {k}")
        full = [sz + 2 * pp - kk + 1 for sz, pp, kk in zip(x.shape[2:], p, k)]
        y = self.pool(node, x, kind, k, (1, 1), p, (c, *full), suffix="dense", main=False)
        rows = [np.arange(o) * ss + pp - b for o, ss, pp, b in zip(out, s, p, begin)]
        return [self.gather_fn(node, y, lambda ids: ids[:, :, rows[0]][:, :, :, rows[1]])]

    def op_GlobalAveragePool(self, node, ins):
        return [self.global_pool(node, ins[0], "avgpool")]

    def op_GlobalMaxPool(self, node, ins):
        return [self.global_pool(node, ins[0], "maxpool")]

    def global_pool(self, node, x, kind):
        self.need4(node, x)
        c, h, w = x.shape[1:]
        return self.pool(node, x, kind, (h, w), (h, w), (0, 0), (c, 1, 1))

    def op_ReduceMean(self, node, ins):
        return [self.reduce(node, ins, "avgpool")]

    def op_ReduceMax(self, node, ins):
        return [self.reduce(node, ins, "maxpool")]

    def reduce(self, node, ins, kind):
        x = ins[0]
        axes = self.attr(node, "axes", None)
        if axes is None and len(ins) > 1 and ins[1] is not None:
            axes = self.const_input(node, ins[1], "axes").astype(np.int64).tolist()
        rank = len(x.shape)
        if not axes and self.attr(node, "noop_with_empty_axes", 0):
            return x
        if not axes:
            self.fail(node, "a reduction over every dimension, the batch included")
        axes = sorted({int(a) % rank for a in axes})
        keep = bool(self.attr(node, "keepdims", 1))
        first = axes[0]
        if first < 2 or axes != list(range(first, rank)):
            self.fail(node, f"a reduction over dims {axes} of {_fmt(x.shape)} (only trailing dims after the "
                            "channels, e.g. the spatial dims 2 and 3)")
        out_shape = tuple(x.shape[1:first]) + ((1,) * (rank - first) if keep else ())
        if rank == 4 and first == 2:
            h, w = x.shape[2:]
            return self.pool(node, x, kind, (h, w), (h, w), (0, 0), out_shape)
        # view as (C', 1, L) and pool over the L reduced elements
        lead, length = int(np.prod(x.shape[1:first])), int(np.prod(x.shape[first:]))
        y = self.gather_fn(node, x, lambda ids: ids.reshape(self.batch, lead, 1, length), suffix="view", main=False)
        return self.pool(node, y, kind, (1, length), (1, length), (0, 0), out_shape)

    # --- channels, resampling ----------------------------------------------------------------
    def op_Concat(self, node, ins):
        if not all(isinstance(v, _Dyn) for v in ins):
            self.fail(node, "concatenation of an activation with a constant")
        rank = len(ins[0].shape)
        axis = int(self.attr(node, "axis")) % rank
        if axis != 1:
            self.fail(node, f"concatenation along dim {axis} (only channels, dim 1)")
        rest = {tuple(v.shape[2:]) for v in ins}
        if len(rest) != 1 or any(len(v.shape) != rank for v in ins):
            self.fail(node, f"inputs of shapes {', '.join(_fmt(v.shape) for v in ins)} do not concatenate")
        shape = (sum(v.shape[1] for v in ins),) + tuple(ins[0].shape[2:])
        return [self.emit(node, "concat", [v.name for v in ins], shape)]

    def op_Resize(self, node, ins):
        mode = self.attr(node, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if any(isinstance(v, _Dyn) for v in ins[1:]):
            self.fail(node, "scales or sizes computed from the input activation")
        if mode == "nearest":   # copies elements: an exact gather
            return self.replay(node, ins)
        if mode not in ("linear", "bilinear"):
            self.fail(node, f"mode {mode!r} (only nearest, and linear as a float op)")
        x = ins[0]
        self.need4(node, x)
        if self.attr(node, "antialias", 0):
            self.fail(node, "antialias=1")
        # Upsample and opset-10 Resize have no choice: they map coordinates as "asymmetric"
        old = node.op_type == "Upsample" or self.opset < 11
        ctm = b"asymmetric" if old else self.attr(node, "coordinate_transformation_mode", b"half_pixel")
        ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
        if ctm not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            self.fail(node, f"coordinate_transformation_mode {ctm!r} (only half_pixel, pytorch_half_pixel and "
                            "align_corners have a torch equivalent)")
        size = self.resize_size(node, ins, x.shape)
        if tuple(size[:2]) != tuple(x.shape[:2]):
            self.fail(node, f"resizing the batch or channel dims ({_fmt(x.shape)} -> {_fmt(size)})")
        return [self.float_op(node, x, "interpolate", shape=size[1:], size=[int(size[2]), int(size[3])],
                              mode="bilinear", align_corners=ctm == "align_corners")]

    op_Upsample = op_Resize

    def resize_size(self, node, ins, shape):
        """Output shape of a Resize/Upsample: ``sizes`` if given, else floor(shape * scales)."""
        rank = len(shape)
        axes = self.attr(node, "axes", None)
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
        if node.op_type == "Upsample" or self.opset < 11:
            scales = ins[1] if len(ins) > 1 else np.asarray(self.attr(node, "scales"))
            sizes = None
        else:
            scales = ins[2] if len(ins) > 2 else None
            sizes = ins[3] if len(ins) > 3 else None
        out = list(shape)
        if sizes is not None and np.asarray(sizes).size:
            if self.attr(node, "keep_aspect_ratio_policy", b"stretch") not in (b"stretch", "stretch"):
                self.fail(node, "keep_aspect_ratio_policy other than stretch")
            for a, v in zip(axes, np.asarray(sizes).reshape(-1)):
                out[a] = int(v)
        elif scales is not None and np.asarray(scales).size:
            for a, v in zip(axes, np.asarray(scales, dtype=np.float64).reshape(-1)):
                out[a] = int(math.floor(shape[a] * float(np.float32(v))))
        else:
            self.fail(node, "neither scales nor sizes")
        return out

    # --- dispatch ----------------------------------------------------------------------------
    def supported(self) -> list[str]:
        ops = {m[3:] for m in dir(self) if m.startswith("op_")}
        return sorted(ops | set(_MOVES) | set(_ALIAS) | set(_FLOAT_UNARY) | {"Shape", "Size", "Constant"})

    def run_node(self, node, ins):
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            self.fail(node, f"op of domain {node.domain!r}; supported (default domain): {', '.join(self.supported())}")
        if op in ("Shape", "Size"):   # the shape of an activation is a constant of the graph
            return self.reference(node, [np.zeros(ins[0].shape, np.float32)])
        if op in _ALIAS:
            if op == "Cast" and self.attr(node, "to") != self.onnx.TensorProto.FLOAT:
                self.fail(node, "casting an activation to a type other than float32")
            if op == "CastLike" and not (isinstance(ins[1], _Dyn) or np.asarray(ins[1]).dtype == np.float32):
                self.fail(node, "casting an activation to a type other than float32")
            return [ins[0]]   # Dropout's mask output is not computed: build() fails if it is read
        if op in _MOVES:
            if not isinstance(ins[0], _Dyn):
                self.fail(node, "data movement whose indices come from the input activation")
            return self.replay(node, ins)
        if op in _FLOAT_UNARY:
            return [self.float_op(node, ins[0], _FLOAT_UNARY[op])]
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            self.fail(node, f"op {op} is not supported on activations; supported: {', '.join(self.supported())}")
        return handler(node, ins)   # extra outputs nobody computes (MaxPool indices) fail in build() if read

    def build(self) -> Graph:
        g = self.model.graph
        order = _needed_in_order(g, self.output_name, self.input_info.name, self.consts)
        # names for the nodes that read the input (constant folding leaves no IR node for the rest)
        dynamic, live = [], {self.input_info.name}
        for n in order:
            if n.op_type not in ("Shape", "Size") and any(i in live for i in n.input):
                dynamic.append(n)
                live.update(n.output)
        self.short = {id(n): s for n, s in zip(dynamic, _base_names(dynamic))}
        readers = {}
        for n in order:
            for i in n.input:
                readers[i] = readers.get(i, 0) + 1
        readers[self.output_name] = readers.get(self.output_name, 0) + 1
        for node in order:
            ins = []
            for i in node.input:
                if not i:
                    ins.append(None)
                elif i in self.dyn:
                    ins.append(self.dyn[i])
                elif i in self.consts:
                    ins.append(self.consts[i])
                else:
                    self.fail(node, f"reads tensor {i!r}, which no node, initializer or input defines")
            if not any(isinstance(v, _Dyn) for v in ins):
                outs = self.reference(node, ins)   # constant folding
                for name, v in zip(node.output, outs):
                    if name:
                        self.consts[name] = np.asarray(v)
                continue
            outs = self.run_node(node, ins)
            for k, name in enumerate(node.output):
                if not name:
                    continue
                v = outs[k] if k < len(outs) else None
                if v is None:
                    if readers.get(name):
                        self.fail(node, f"output {k} ({name!r}) is read by another node but netquant does not "
                                        "compute it")
                    continue
                if isinstance(v, _Dyn):
                    self.dyn[name] = v
                else:
                    self.consts[name] = np.asarray(v)
        if self.output_name not in self.dyn:
            raise OnnxImportError(f"the model output {self.output_name!r} does not depend on the input")
        return Graph(tuple(self.nodes), self.dyn[self.output_name].name, "onnx")


def _needed_in_order(g, output: str, input_name: str, consts: dict) -> list:
    """The nodes the output depends on, in a topological order (ONNX asks for one, but not every
    exporter writes one); dead nodes are dropped, so an unsupported op nobody reads is harmless."""
    producer = {}
    for n in g.node:
        for o in n.output:
            if o:
                producer[o] = n
    need, stack = set(), [output]
    while stack:
        t = stack.pop()
        n = producer.get(t)
        if n is None or id(n) in need:
            continue
        need.add(id(n))
        stack.extend(i for i in n.input if i)
        for a in n.attribute:   # subgraphs (If, Loop) read outer tensors too
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                stack.extend(i for sn in sub.node for i in sn.input if i)
    nodes = [n for n in g.node if id(n) in need]
    ready = set(consts) | {input_name, ""}
    order, pending = [], nodes
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in ready and i not in producer})
            raise OnnxImportError(f"the ONNX graph has a cycle or reads undefined tensors "
                                  f"({', '.join(missing[:5]) or 'a cycle'}), at node "
                                  f"{rest[0].name or rest[0].output[0]!r} ({rest[0].op_type})")
        pending = rest
    return order


def _fmt(shape) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


# --- graph clean-up ---------------------------------------------------------------------------
def _prune(graph: Graph) -> Graph:
    """Drop nodes the output does not read (the unused parts of a Split, for example)."""
    live, stack = set(), [graph.output]
    by_name = {n.name: n for n in graph.nodes}
    while stack:
        name = stack.pop()
        if name in live:
            continue
        live.add(name)
        stack.extend(by_name[name].inputs)
    return graph.replace_nodes([n for n in graph.nodes if n.name in live or n.op == "input"])


def _fuse_gated(graph: Graph) -> Graph:
    """x * hardsigmoid(x) -> hardswish(x), x * sigmoid(x) -> silu(x): how older opsets export
    torch's hardswish and SiLU; one float op instead of two, the same function."""
    gates = {"hardsigmoid": "hardswish", "sigmoid": "silu"}
    nodes = list(graph.nodes)
    by_name = {n.name: n for n in nodes}
    drop = set()
    for k, n in enumerate(nodes):
        if not (n.op == "float" and n.attrs["fn"] == "mul" and len(n.inputs) == 2):
            continue
        for x, g in (n.inputs, n.inputs[::-1]):
            gate = by_name[g]
            if (gate.op == "float" and gate.attrs["fn"] in gates and gate.inputs == (x,) and
                    len(graph.consumers(g)) == 1 and g != graph.output and gate.shape == n.shape):
                nodes[k] = n.with_(op="float", inputs=(x,), attrs={"fn": gates[gate.attrs["fn"]], "kwargs": {}},
                                   layers=gate.layers + n.layers)
                drop.add(g)
                break
    return graph.replace_nodes([n for n in nodes if n.name not in drop])


def _tidy_fused_names(graph: Graph, short: dict) -> Graph:
    """passes.fuse_activations names a fused node ``<conv>_<activation layer>``, and our layer
    names are raw ONNX names ('/layer1/layer1.0/relu/Relu'); use the activation's short IR name,
    without the scope it shares with the conv: layer1_0_conv1 + layer1_0_relu -> layer1_0_conv1_relu."""
    mapping, used = {}, set(n.name for n in graph.nodes)
    for n in graph.nodes:
        if len(n.layers) < 2 or n.layers[-1] not in short or not n.name.endswith("_" + n.layers[-1]):
            continue
        head = n.name[:-len(n.layers[-1]) - 1]
        used.discard(n.name)
        a, b = head.split("_"), short[n.layers[-1]].split("_")
        common = 0
        while common < min(len(a), len(b)) - 1 and a[common] == b[common]:
            common += 1
        while common and b[common][:1].isdigit():   # conv1_0 + conv1_2: conv1_0_conv1_2, not conv1_0_2
            common -= 1
        new = c_ident("_".join([head] + b[common:]))
        base, k = new, 1
        while new in used:
            new = f"{base}_{k}"
            k += 1
        used.add(new)
        if new != n.name:
            mapping[n.name] = new
    if not mapping:
        return graph
    nodes = [n.with_(name=mapping.get(n.name, n.name)) for n in graph.nodes]
    return graph.replace_nodes(rename_inputs(nodes, mapping), mapping.get(graph.output, graph.output))


# --- the public entry point -------------------------------------------------------------------
def import_onnx(source: Union[str, os.PathLike, bytes, "onnx.ModelProto"], *, name: Optional[str] = None,
                input_shape: Optional[tuple] = None, check: bool = True) -> Graph:
    """Read an ONNX image classifier (a path, the file's bytes or an ``onnx.ModelProto``) into an
    optimized float :class:`Graph` whose ``source`` is ``name`` (default: the file name, else the
    ONNX graph's name).

    ``input_shape``: (C, H, W) for a model whose input has a symbolic height or width (a fully
    convolutional net exported with dynamic axes). An NHWC input (N, H, W, 3) is taken as NCHW
    images, with the transpose in the graph. With ``check``, the ONNX model (in onnxruntime, or
    onnx.reference without it) and the graph run on one random batch in [0, 1] and must agree
    within 1e-4 of the largest output (float rounding is ~1e-7 of it), else OnnxImportError.
    Use the graph with ``netquant.Quantizer(graph=import_onnx("net.onnx"), name="net")``."""
    model, default_name = _load(source)
    if model.functions:   # model-local functions (some exporters): inline them into plain nodes
        from onnx import inliner
        model = inliner.inline_local_functions(model)
    imp = _Importer(model, input_shape)
    graph = imp.build()
    graph = _fuse_gated(_prune(graph))
    graph = optimize(graph)
    graph = _tidy_fused_names(graph, imp.layer_short)
    label = name or default_name or model.graph.name or "onnx"
    if not any(n.op in ("conv", "linear") for n in graph.nodes):
        raise OnnxImportError(f"ONNX model {label!r} has no Conv, Gemm or MatMul layer to quantize")
    graph = Graph(graph.nodes, graph.output, label)
    log.info("imported ONNX model %s (opset %d): %d nodes", label, imp.opset, len(graph.nodes))
    if check:
        _self_check(model, graph, imp)
    return graph


def _self_check(model, graph: Graph, imp: _Importer) -> None:
    """Run the ONNX model (onnxruntime, else onnx.reference) and the imported graph on the same
    random batch; they must agree within CHECK_RTOL of the largest output."""
    import torch

    from .float_exec import run_float

    rng = np.random.default_rng(0)
    x = rng.random((imp.batch,) + imp.in_shape, dtype=np.float32)
    feed = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if imp.nhwc else x
    try:
        import onnxruntime as ort
    except ImportError:   # the [onnx] extra installs it; without it the (slow) numpy reference
        ort = None
    engine = "onnxruntime" if ort is not None else "onnx.reference"
    try:
        if ort is not None:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            want = sess.run([imp.output_name], {imp.input_info.name: feed})[0]
        else:
            from onnx.reference import ReferenceEvaluator

            want = ReferenceEvaluator(model).run([imp.output_name], {imp.input_info.name: feed})[0]
    except Exception as e:   # an engine's own failure: say so rather than pass it on unexplained
        raise OnnxImportError(f"the self-check could not run ONNX model {graph.source!r} in {engine}: "
                              f"{type(e).__name__}: {e} (import_onnx(..., check=False) skips the check)") from e
    got = run_float(graph, torch.from_numpy(x), keep=())[graph.output].numpy()
    want = np.asarray(want, dtype=np.float32)
    if want.size != got.size or want.shape[0] != got.shape[0]:
        raise OnnxImportError(f"imported graph {graph.source!r} gives output shape {_fmt(got.shape)}, "
                              f"{engine} gives {_fmt(want.shape)}")
    err = float(np.abs(want.reshape(got.shape) - got).max())
    tol = CHECK_RTOL * float(np.abs(want).max()) + 1e-6
    if not err <= tol:
        raise OnnxImportError(f"imported graph {graph.source!r} computes something else than the ONNX model: "
                              f"max difference {err:.3g} against {engine} on a random batch (tolerance {tol:.3g}); "
                              "please report this model (import_onnx(..., check=False) skips the check)")
    log.info("self-check against %s: max difference %.3g (tolerance %.3g)", engine, err, tol)
