"""Capture a torch image classifier into netquant's :class:`~netquant.ir.graph.Graph`.

``capture(model, example)`` traces the model with ``torch.fx``, runs the trace once on an
example batch to learn every shape, and maps each traced op to a graph node named after the
model's own layers (the module path, e.g. ``S1U1_conv1`` or ``layer1.0.conv1``; an op inside a
custom module takes that module's path, so ``Add`` modules give ``add11``).

Pure data movement (view, reshape, flatten, transpose, permute, slicing, chunk/split, zero
padding, channel shuffle) is captured generically: the op is replayed on a tensor holding
element numbers 1..n, and what comes out is the gather index of the node. So any chain of them
is exact in integers, whatever the model wrote.
"""
from __future__ import annotations

import inspect
import logging
import math
import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .float_exec import run_float
from .float_ops import FLOAT_OPS
from .graph import Graph, Node
from .passes import optimize

log = logging.getLogger(__name__)

INF = math.inf
_MOVES_FN = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.chunk, torch.split,
             torch.squeeze, torch.unsqueeze, operator.getitem, F.pad, torch.unbind, torch.narrow}
_MOVES_METHOD = {"view", "reshape", "flatten", "transpose", "permute", "contiguous", "chunk", "split",
                 "squeeze", "unsqueeze", "unbind", "narrow", "view_as", "reshape_as"}
_METADATA_METHOD = {"size", "dim", "ndimension", "numel", "nelement"}   # constants: shapes of activations
_METADATA_ATTR = {"shape", "ndim", "dtype", "device"}
_INPLACE_FN = {torch.relu_, operator.iadd, operator.isub, operator.imul, operator.itruediv}
_IDENTITY_FN = {F.dropout, F.dropout2d, torch.clone, torch.detach}
_IDENTITY_METHOD = {"clone", "detach", "float", "contiguous_"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_RELU = {F.relu, torch.relu, torch.relu_, "relu", "relu_"}
_CLAMP = {torch.clamp, torch.clip, "clamp", "clamp_", "clip", "clip_"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_MEAN = {torch.mean, "mean"}
_FLOAT_FN = {torch.softmax: "softmax", F.softmax: "softmax", "softmax": "softmax", F.log_softmax: "log_softmax",
             torch.log_softmax: "log_softmax", "log_softmax": "log_softmax", torch.sigmoid: "sigmoid",
             F.sigmoid: "sigmoid", "sigmoid": "sigmoid", torch.tanh: "tanh", "tanh": "tanh", F.gelu: "gelu",
             F.silu: "silu", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", torch.exp: "exp",
             "exp": "exp", F.leaky_relu: "leaky_relu", F.elu: "elu"}
_FLOAT_MODULES = {nn.Softmax: ("softmax", ["dim"]), nn.LogSoftmax: ("log_softmax", ["dim"]),
                  nn.Sigmoid: ("sigmoid", []), nn.Tanh: ("tanh", []), nn.GELU: ("gelu", []),
                  nn.SiLU: ("silu", []), nn.Hardswish: ("hardswish", []), nn.Hardsigmoid: ("hardsigmoid", []),
                  nn.LeakyReLU: ("leaky_relu", ["negative_slope"]), nn.ELU: ("elu", ["alpha"])}


class CaptureError(ValueError):
    """The model holds something netquant cannot represent; the message names the node."""


class _Recorder(fx.Interpreter):
    """Runs the traced graph once and keeps every node's value."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        v = super().run_node(n)
        self.values[n] = v
        return v


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy().copy()


class _Builder:
    def __init__(self, gm: fx.GraphModule, values: dict, example: torch.Tensor):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.values = values
        self.example = example
        self.nodes: list[Node] = []
        self.alias: dict = {}      # fx node -> IR name of the tensor it carries
        self.tuples: dict = {}     # fx node (tuple of tensors) -> (IR source name, tuple of index tensors)
        self.used: set = set()

    # --- helpers --------------------------------------------------------------------------
    def dynamic(self, a) -> bool:
        return isinstance(a, fx.Node) and (a in self.alias or a in self.tuples)

    def const(self, a):
        """The recorded value of a non-dynamic argument (python value or constant tensor)."""
        if isinstance(a, fx.Node):
            return self.values[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.const(x) for x in a)
        return a

    def layer_name(self, n: fx.Node) -> str:
        if n.op == "call_module":
            return str(n.target)
        stack = n.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1]
            path = path[0] if isinstance(path, tuple) else path
            if path:
                return str(path)
        return n.name

    def unique(self, base: str, n: fx.Node) -> str:
        name = base if base not in self.used else f"{base}_{n.name}"
        self.used.add(name)
        return name

    def emit(self, n: fx.Node, op: str, inputs, attrs=None, params=None, reason=None) -> None:
        layer = self.layer_name(n)
        value = self.values[n]
        shape = tuple(value.shape[1:])
        node = Node(self.unique(layer, n), op, tuple(inputs), shape, dict(attrs or {}),
                    dict(params or {}), (layer,), reason)
        self.nodes.append(node)
        self.alias[n] = node.name

    def inplace(self, n: fx.Node) -> bool:
        """Does ``n`` overwrite its first argument, an activation (``nn.ReLU(inplace=True)``,
        ``F.relu(x, inplace=True)``, ``x.relu_()``, ``x.add_(y)``)?"""
        if not (n.args and isinstance(n.args[0], fx.Node) and n.args[0] in self.alias):
            return False
        if n.op == "call_module":
            return getattr(self.modules[n.target], "inplace", False) is True
        if n.op == "call_method":
            return n.target.endswith("_")
        if n.target in _INPLACE_FN:
            return True
        try:
            bound = inspect.signature(n.target).bind(*n.args, **n.kwargs)
        except (TypeError, ValueError):
            return False
        return bound.arguments.get("inplace") is True

    def fail(self, n: fx.Node, what: str):
        raise CaptureError(f"cannot capture node {n.name!r} (layer {self.layer_name(n)!r}): {what}")

    # --- data movement --------------------------------------------------------------------
    def index_value(self, n: fx.Node, src_fx: fx.Node):
        """Replay op ``n`` on element numbers of its dynamic input (a batch of 2, numbered
        1..size per image) and return the per-image index (or a tuple of them)."""
        src_val = self.values[src_fx]
        size = src_val[0].numel()
        ids = torch.arange(1, size + 1, dtype=torch.float64).reshape(src_val.shape[1:])
        ids = torch.stack([ids, ids + size])  # image 1 is numbered after image 0
        args = [ids if a is src_fx else self.const(a) for a in n.args]
        kwargs = {k: (ids if v is src_fx else self.const(v)) for k, v in n.kwargs.items()}
        if n.op == "call_method":
            out = getattr(args[0], n.target)(*args[1:], **kwargs)
        elif n.op == "call_module":
            out = self.modules[n.target](*args, **kwargs)
        else:
            out = n.target(*args, **kwargs)
        return out, size

    def to_index(self, n, out, size) -> np.ndarray:
        if out.shape[0] != 2:
            self.fail(n, f"data movement changes the batch dimension (shape {tuple(out.shape)})")
        a, b = out[0].reshape(-1), out[1].reshape(-1)
        if not torch.equal(torch.where(a > 0, a + size, a), b):
            self.fail(n, "data movement mixes images of a batch")
        return a.to(torch.int64).numpy()

    def gather(self, n: fx.Node, src_fx: fx.Node) -> None:
        if src_fx in self.tuples:  # getitem on the result of chunk/split
            src_name, parts = self.tuples[src_fx]
            idx = parts[n.args[1]]
            self.emit(n, "gather", [src_name], params={"index": idx})
            return
        out, size = self.index_value(n, src_fx)
        if isinstance(out, (tuple, list)):
            self.tuples[n] = (self.alias[src_fx], [self.to_index(n, o, size) for o in out])
            return
        if n.target is F.pad:
            mode = n.kwargs.get("mode", n.args[2] if len(n.args) > 2 else "constant")
            value = n.kwargs.get("value", n.args[3] if len(n.args) > 3 else 0)
            if mode != "constant" or (value or 0) != 0:
                self.fail(n, "only zero padding is supported")
        self.emit(n, "gather", [self.alias[src_fx]], params={"index": self.to_index(n, out, size)})

    # --- ops ------------------------------------------------------------------------------
    def affine_const(self, n, x_fx, c, kind) -> None:
        """x (+ - * /) constant, with the constant per channel (dim 1) or a scalar."""
        x_val = self.values[x_fx]
        ch = x_val.shape[1]
        c = torch.as_tensor(c, dtype=torch.float64)
        full = torch.broadcast_to(c, x_val.shape[1:]) if c.dim() <= x_val.dim() - 1 else None
        if c.dim() == x_val.dim():
            if c.shape[0] != 1:
                self.fail(n, "a constant operand with a batch dimension")
            full = torch.broadcast_to(c[0], x_val.shape[1:])
        if full is None:
            self.fail(n, f"constant operand of shape {tuple(c.shape)}")
        per_c = full.reshape(ch, -1)
        if not torch.all(per_c == per_c[:, :1]):
            self.fail(n, "a constant operand that varies over space (only per-channel constants)")
        v = per_c[:, 0].numpy()
        one = np.ones(ch)
        scale, shift = {"add": (one, v), "sub": (one, -v), "mul": (v, 0 * v), "div": (1 / v, 0 * v)}[kind]
        self.emit(n, "affine", [self.alias[x_fx]],
                  params={"scale": scale.astype(np.float32), "shift": shift.astype(np.float32)})

    def binary(self, n, kind: str) -> None:
        a, b = n.args[0], n.args[1]
        alpha = n.kwargs.get("alpha", 1)
        if self.dynamic(a) and self.dynamic(b):
            if kind == "add" and alpha == 1:
                self.emit(n, "add", [self.alias[a], self.alias[b]], {"act": None})
            elif kind == "mul":
                self.emit(n, "float", [self.alias[a], self.alias[b]], {"fn": "mul", "kwargs": {}})
            else:
                self.fail(n, f"{kind} of two activations is not supported")
        elif self.dynamic(a):
            self.affine_const(n, a, self.const(b) * (alpha if kind in ("add", "sub") else 1), kind)
        elif kind in ("add", "mul"):
            self.affine_const(n, b, self.const(a), kind)
        else:
            self.fail(n, f"constant {kind} activation is not supported")

    def pool(self, n, kind, kernel, stride, padding):
        self.emit(n, kind, [self.alias[n.args[0]]], {"kernel": _pair(kernel), "stride": _pair(stride or kernel),
                                                     "padding": _pair(padding)})

    def adaptive(self, n, kind, out_size):
        h, w = self.values[n.args[0]].shape[2:]
        oh, ow = _pair(out_size)
        oh, ow = oh or h, ow or w
        if h % oh or w % ow:
            self.fail(n, f"adaptive pooling from {h}x{w} to {oh}x{ow} is not a uniform window")
        k = (h // oh, w // ow)
        self.pool(n, kind, k, k, 0)

    def act(self, n, x_fx, lo, hi) -> None:
        self.emit(n, "act", [self.alias[x_fx]], {"act": (float(lo), float(hi))})

    def call_module(self, n: fx.Node) -> None:
        m = self.modules[n.target]
        x = n.args[0]
        if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d)):
            self.alias[n] = self.alias[x]
        elif isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                self.fail(n, f"conv padding_mode {m.padding_mode!r} (only zeros)")
            pad = m.padding
            if isinstance(pad, str):
                if pad == "valid":
                    pad = (0, 0)
                elif m.stride == (1, 1) and all(k % 2 for k in m.kernel_size):
                    pad = tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size))
                else:
                    self.fail(n, "padding='same' with even kernels or strides")
            bias = m.bias if m.bias is not None else torch.zeros(m.out_channels)
            self.emit(n, "conv", [self.alias[x]],
                      {"stride": tuple(m.stride), "padding": tuple(pad), "dilation": tuple(m.dilation),
                       "groups": m.groups, "act": None},
                      {"weight": _np(m.weight), "bias": _np(bias)})
        elif isinstance(m, nn.Linear):
            bias = m.bias if m.bias is not None else torch.zeros(m.out_features)
            self.emit(n, "linear", [self.alias[x]], {"act": None}, {"weight": _np(m.weight), "bias": _np(bias)})
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            scale = m.weight.detach().double() / torch.sqrt(m.running_var.double() + m.eps)
            shift = m.bias.detach().double() - m.running_mean.double() * scale
            self.emit(n, "affine", [self.alias[x]], {}, {"scale": _np(scale), "shift": _np(shift)})
        elif isinstance(m, nn.ReLU):
            self.act(n, x, 0, INF)
        elif isinstance(m, nn.ReLU6):
            self.act(n, x, 0, 6)
        elif isinstance(m, nn.Hardtanh):
            self.act(n, x, m.min_val, m.max_val)
        elif isinstance(m, nn.MaxPool2d):
            if _pair(m.dilation) != (1, 1) or m.ceil_mode:
                self.fail(n, "max pooling with dilation or ceil_mode")
            self.pool(n, "maxpool", m.kernel_size, m.stride, m.padding)
        elif isinstance(m, nn.AvgPool2d):
            if m.ceil_mode or m.divisor_override or (not m.count_include_pad and _pair(m.padding) != (0, 0)):
                self.fail(n, "average pooling with ceil_mode, divisor_override or count_include_pad=False")
            self.pool(n, "avgpool", m.kernel_size, m.stride, m.padding)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            self.adaptive(n, "avgpool", m.output_size)
        elif isinstance(m, nn.AdaptiveMaxPool2d):
            self.adaptive(n, "maxpool", m.output_size)
        elif isinstance(m, (nn.Flatten, nn.Unflatten, nn.ChannelShuffle)):
            self.gather(n, x)
        elif type(m) in _FLOAT_MODULES:
            fn, keys = _FLOAT_MODULES[type(m)]
            self.emit(n, "float", [self.alias[x]], {"fn": fn, "kwargs": {k: getattr(m, k) for k in keys}})
        else:
            self.fail(n, f"module of type {type(m).__name__} is not supported")

    def call_function(self, n: fx.Node) -> None:
        f = n.target  # a function, or a method name for call_method
        args = n.args
        x = args[0] if args else None
        if f in _IDENTITY_FN or f in _IDENTITY_METHOD or (f == "to" and not any(isinstance(a, torch.device) for a in args)):
            self.alias[n] = self.alias[x]
        elif f in _ADD:
            self.binary(n, "add")
        elif f in _SUB:
            self.binary(n, "sub")
        elif f in _MUL:
            self.binary(n, "mul")
        elif f in _DIV:
            self.binary(n, "div")
        elif f in _RELU:
            self.act(n, x, 0, INF)
        elif f is F.relu6:
            self.act(n, x, 0, 6)
        elif f is F.hardtanh:
            self.act(n, x, n.kwargs.get("min_val", args[1] if len(args) > 1 else -1.0),
                     n.kwargs.get("max_val", args[2] if len(args) > 2 else 1.0))
        elif f in _CLAMP:
            lo = n.kwargs.get("min", args[1] if len(args) > 1 else None)
            hi = n.kwargs.get("max", args[2] if len(args) > 2 else None)
            self.act(n, x, -INF if lo is None else self.const(lo), INF if hi is None else self.const(hi))
        elif f in _CAT:
            tensors = args[0]
            dim = n.kwargs.get("dim", args[1] if len(args) > 1 else 0)
            rank = self.values[n].dim()
            if dim % rank != 1:
                self.fail(n, f"concatenation along dim {dim} (only channels, dim 1)")
            self.emit(n, "concat", [self.alias[t] for t in tensors])
        elif f in _MEAN:
            dims = n.kwargs.get("dim", args[1] if len(args) > 1 else None)
            rank = self.values[x].dim()
            if rank != 4 or dims is None or sorted(d % 4 for d in _pair(dims)) != [2, 3]:
                self.fail(n, f"mean over dims {dims} (only the spatial dims 2 and 3)")
            h, w = self.values[x].shape[2:]
            self.pool(n, "avgpool", (h, w), (h, w), 0)
        elif f is F.max_pool2d:
            k = n.kwargs.get("kernel_size", args[1] if len(args) > 1 else None)
            s = n.kwargs.get("stride", args[2] if len(args) > 2 else None)
            p = n.kwargs.get("padding", args[3] if len(args) > 3 else 0)
            d = n.kwargs.get("dilation", args[4] if len(args) > 4 else 1)
            if _pair(d) != (1, 1) or n.kwargs.get("ceil_mode", args[5] if len(args) > 5 else False):
                self.fail(n, "max pooling with dilation or ceil_mode")
            self.pool(n, "maxpool", k, s or k, p)
        elif f is F.avg_pool2d:
            k = n.kwargs.get("kernel_size", args[1] if len(args) > 1 else None)
            s = n.kwargs.get("stride", args[2] if len(args) > 2 else None)
            p = n.kwargs.get("padding", args[3] if len(args) > 3 else 0)
            ceil = n.kwargs.get("ceil_mode", args[4] if len(args) > 4 else False)
            include_pad = n.kwargs.get("count_include_pad", args[5] if len(args) > 5 else True)
            if ceil or n.kwargs.get("divisor_override", args[6] if len(args) > 6 else None) or \
                    (not include_pad and _pair(p) != (0, 0)):
                self.fail(n, "average pooling with ceil_mode, divisor_override or count_include_pad=False")
            self.pool(n, "avgpool", k, s or k, p)
        elif f is F.adaptive_avg_pool2d:
            self.adaptive(n, "avgpool", n.kwargs.get("output_size", args[1] if len(args) > 1 else None))
        elif f is F.adaptive_max_pool2d:
            self.adaptive(n, "maxpool", n.kwargs.get("output_size", args[1] if len(args) > 1 else None))
        elif f in _FLOAT_FN:
            kwargs = {}
            if _FLOAT_FN[f] in ("softmax", "log_softmax"):
                kwargs["dim"] = n.kwargs.get("dim", args[1] if len(args) > 1 else 1)
            self.emit(n, "float", [self.alias[x]], {"fn": _FLOAT_FN[f], "kwargs": kwargs})
        elif f in _MOVES_FN or f in _MOVES_METHOD:
            srcs = [a for a in list(args) + list(n.kwargs.values()) if self.dynamic(a)]
            if len(srcs) != 1:
                self.fail(n, "data movement over several activations")
            self.gather(n, srcs[0])
        else:
            name = f if isinstance(f, str) else getattr(f, "__name__", str(f))
            self.fail(n, f"op {name!r} is not supported")

    def build(self, gm: fx.GraphModule) -> Graph:
        output = None
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                if self.nodes:
                    self.fail(n, "models with more than one input are not supported")
                # the input is named after the forward() argument (often "x"); a layer named
                # "input" (the normalisation of our ResNets) keeps its own name
                name = n.name
                self.nodes.append(Node(name, "input", (), tuple(self.example.shape[1:]), {}, {}, (name,)))
                self.used.add(name)
                self.alias[n] = name
            elif n.op == "get_attr":
                continue
            elif n.op in ("call_module", "call_function", "call_method"):
                if not any(self.dynamic(a) for a in _flat_args(n)) or _metadata(n):
                    continue  # constant folding: shapes, sizes, buffers (read back by const())
                if n.op == "call_module":
                    self.call_module(n)
                else:
                    self.call_function(n)
                if self.inplace(n) and n in self.alias:
                    # the tensor was overwritten: whoever reads it later (``y = x`` before
                    # ``relu_(x)``) reads the result
                    self.alias[n.args[0]] = self.alias[n]
            elif n.op == "output":
                out = n.args[0]
                if not (isinstance(out, fx.Node) and out in self.alias):
                    raise CaptureError("the model must return a single tensor")
                output = self.alias[out]
        return Graph(tuple(self.nodes), output, type(gm).__name__)


def _metadata(n: fx.Node) -> bool:
    """Does ``n`` read only the shape of a tensor (``x.size(0)``, ``x.shape``, ``x.dim()``)? The
    value recorded on the example batch is then a constant of the graph."""
    if n.op == "call_method":
        return n.target in _METADATA_METHOD
    return n.op == "call_function" and (n.target is torch.numel or (
        n.target is getattr and len(n.args) == 2 and n.args[1] in _METADATA_ATTR))


def _flat_args(n: fx.Node):
    out = []

    def walk(a):
        if isinstance(a, (list, tuple)):
            for x in a:
                walk(x)
        elif isinstance(a, dict):
            for x in a.values():
                walk(x)
        else:
            out.append(a)

    walk(n.args)
    walk(n.kwargs)
    return out


def capture(model: nn.Module, example: torch.Tensor | None = None, optimize_graph: bool = True) -> Graph:
    """Trace ``model`` (in eval mode) into a Graph; fold batch norms and fuse activations unless
    ``optimize_graph`` is False. ``example``: an input batch (default: 2 CIFAR-sized images), on
    which the graph must compute what the model computes (else a CaptureError)."""
    if model.training:
        raise CaptureError(f"{type(model).__name__} is in training mode; call model.eval() first")
    if example is None:
        example = torch.rand(2, 3, 32, 32)
    if example.dim() != 4:
        raise CaptureError(f"example input must be NCHW, got shape {tuple(example.shape)}")
    example = example[:1].repeat(2, 1, 1, 1) if example.shape[0] != 2 else example
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:
        raise CaptureError(f"torch.fx could not trace {type(model).__name__}: {e}") from e
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(example)
    graph = _Builder(gm, rec.values, example).build(gm)
    if not any(n.op in ("conv", "linear") for n in graph.nodes):
        raise CaptureError(f"{type(model).__name__} has no conv or fully connected layer to quantize")
    graph = Graph(graph.nodes, graph.output, type(model).__name__)
    graph = optimize(graph) if optimize_graph else graph
    _check_against_model(model, graph, example)
    return graph


def _check_against_model(model: nn.Module, graph: Graph, example: torch.Tensor) -> None:
    """The graph must compute what the model computes on ``example``. torch.fx traces ``x += y``
    as ``x + y``, so an in-place update of a tensor that is read again later (``skip = x;
    x += y``) is lost in the trace; such a model is refused rather than quantized wrongly."""
    with torch.no_grad():
        want = model(example.clone())
        got = run_float(graph, example.clone(), keep=())[graph.output]
    err = float((want.to(torch.float32) - got).abs().max())
    tol = 1e-4 * float(want.abs().max()) + 1e-6  # float rounding (batch-norm folding) is ~1e-7 of it
    if not err <= tol:
        raise CaptureError(f"the captured graph of {type(model).__name__} computes something else than the model "
                           f"(max difference {err:.3g} on the example batch); is there an in-place op (x += y, "
                           f"relu_) on a tensor that is read again later, or on a view of it?")
