"""Capture a torch image classifier into netquant's :class:`~netquant.ir.graph.Graph`.

``capture(model, example)`` traces the model with a ``torch.fx`` tracer that runs every op on
the example batch while it traces (:class:`_ConcreteTracer`), and maps each traced op to a graph
node named after the model's own layers (the module path, e.g. ``S1U1_conv1`` or
``layer1.0.conv1``; an op inside a custom module takes that module's path, so ``Add`` modules
give ``add11``).

Shapes are constants. The input shape is declared by the example, so every shape read
(``x.size(0)``, ``x.shape[-1]``, ``out.size()[3]``, ``x.dim()``, ``len(x)``, ``N, C, H, W =
x.size()``) returns the python value measured on the example batch instead of a symbolic
proxy: ``F.avg_pool2d(out, out.size()[3])`` on an 8x8 map is traced as ``avg_pool2d(out, 8)``,
and ``if x.size(1) == 3:`` takes its branch. The batch dimension is baked in as 2 (the example
is two images), which is harmless: every data movement becomes a per-image gather index.

Pure data movement (view, reshape, flatten, transpose, permute, slicing, chunk/split, expand,
zero padding, channel shuffle, nearest-neighbour upsampling) is captured generically: the op is
replayed on a tensor holding element numbers 1..n, and what comes out is the gather index of the
node. So any chain of them is exact in integers, whatever the model wrote. Two activations
combined elementwise (add, sub, mul) always have equal shapes in the graph: a broadcast operand
(the (C, 1, 1) scales of a squeeze-excitation block times its (C, H, W) features) is expanded
first by such a gather, so ``x * s`` with s of shape (16, 1, 1) reads s's element c for all
H*W positions of channel c. ``a - b`` is ``add(a, affine(b, scale -1))``, keeping the add integer.

Resampling: ``nn.Upsample`` / ``F.interpolate`` in mode "nearest" only copies elements (a
gather); "bilinear" and "bicubic" become a float node ``interpolate`` with the output size
measured on the example; "area" by a whole factor is average pooling.

Ops whose results never reach the output (debugging leftovers such as an unused
``x.view(x.size(0), -1)``) are not captured. Anything that cannot be captured raises
:class:`CaptureError` naming the op and the line of the user's code that called it.
"""
from __future__ import annotations

import functools
import inspect
import linecache
import logging
import math
import operator
import os
import re
import sys
import sysconfig
import traceback

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import NetquantError
from .float_exec import run_float
from .float_ops import FLOAT_FNS
from .graph import Graph, Node
from .ops import WEIGHTED_OPS
from .passes import optimize, remove_dead

log = logging.getLogger(__name__)

INF = math.inf
_MOVES_FN = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.chunk, torch.split,
             torch.squeeze, torch.unsqueeze, operator.getitem, F.pad, torch.unbind, torch.narrow, torch.flip,
             torch.roll, torch.movedim, torch.swapaxes, torch.swapdims, torch.select, torch.tile, torch.t,
             torch.unflatten, torch.broadcast_to, F.pixel_shuffle, F.pixel_unshuffle, torch.pixel_shuffle,
             torch.pixel_unshuffle, torch.channel_shuffle}
_MOVES_METHOD = {"view", "reshape", "flatten", "transpose", "permute", "contiguous", "chunk", "split",
                 "squeeze", "unsqueeze", "unbind", "narrow", "view_as", "reshape_as", "expand", "expand_as",
                 "repeat", "tile", "flip", "roll", "movedim", "swapaxes", "swapdims", "select", "unflatten",
                 "t", "__getitem__"}
_SHAPE_ONLY_SECOND = {"view_as", "reshape_as", "expand_as"}   # the second tensor gives only a shape
_METADATA_METHOD = {"size", "dim", "ndimension", "numel", "nelement", "new_zeros", "new_ones", "new_full",
                    "new_empty", "new_tensor"}   # constants: shapes of activations, tensors made from them
_METADATA_FN = {torch.numel, torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like}
_METADATA_ATTR = {"shape", "ndim", "dtype", "device"}
_INPLACE_FN = {torch.relu_, operator.iadd, operator.isub, operator.imul, operator.itruediv}
_IDENTITY_FN = {F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout, torch.clone, torch.detach}
_IDENTITY_METHOD = {"clone", "detach", "contiguous_"}
_CONVERT_METHOD = {"to", "type", "type_as", "float", "cpu", "cuda"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_NEG = {operator.neg, torch.neg, "neg"}
_RELU = {F.relu, torch.relu, torch.relu_, "relu", "relu_"}
_CLAMP = {torch.clamp, torch.clip, "clamp", "clamp_", "clip", "clip_"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_MEAN = {torch.mean, "mean"}
_INTERPOLATE = {F.interpolate: None, F.upsample: None, F.upsample_nearest: "nearest",
                F.upsample_bilinear: "bilinear"}
_FLOAT_FN = {torch.softmax: "softmax", F.softmax: "softmax", "softmax": "softmax", F.log_softmax: "log_softmax",
             torch.log_softmax: "log_softmax", "log_softmax": "log_softmax", torch.sigmoid: "sigmoid",
             F.sigmoid: "sigmoid", "sigmoid": "sigmoid", torch.tanh: "tanh", "tanh": "tanh", F.gelu: "gelu",
             F.silu: "silu", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", torch.exp: "exp",
             "exp": "exp", F.leaky_relu: "leaky_relu", F.elu: "elu"}
_FLOAT_MODULES = {nn.Softmax: ("softmax", ["dim"]), nn.LogSoftmax: ("log_softmax", ["dim"]),
                  nn.Sigmoid: ("sigmoid", []), nn.Tanh: ("tanh", []), nn.GELU: ("gelu", []),
                  nn.SiLU: ("silu", []), nn.Hardswish: ("hardswish", []), nn.Hardsigmoid: ("hardsigmoid", []),
                  nn.LeakyReLU: ("leaky_relu", ["negative_slope"]), nn.ELU: ("elu", ["alpha"])}
# frames in these places are not the user's code: torch itself, the standard library (but not
# the packages installed under it: torchvision or timm models are the user's), this module
_TORCH_DIR = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "")
_STDLIB_DIR = os.path.join(os.path.abspath(sysconfig.get_paths()["stdlib"]), "")
_SITE_DIRS = tuple(os.path.join(os.path.abspath(sysconfig.get_paths()[k]), "") for k in ("purelib", "platlib"))


class CaptureError(NetquantError, ValueError):
    """The model holds something netquant cannot represent; the message names the node and
    the line of the model's code."""


# --- where in the user's code --------------------------------------------------------------
def _is_user_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    if path.startswith(_TORCH_DIR) or path == os.path.abspath(__file__):
        return False
    return not path.startswith(_STDLIB_DIR) or path.startswith(_SITE_DIRS)


def _describe(filename: str, lineno: int, func: str) -> str:
    """``file:line (in func: code)``, e.g. ``resnet.py:57 (in forward: out = F.avg_pool2d(out, 8))``."""
    code = linecache.getline(filename, lineno).strip()
    return f"{filename}:{lineno} (in {func}" + (f": {code})" if code else ")")


def _user_frame() -> str | None:
    """The innermost frame of the model's code on the current stack (the line that called the
    op being traced)."""
    f = sys._getframe(1)
    while f is not None:
        if _is_user_file(f.f_code.co_filename):
            return _describe(f.f_code.co_filename, f.f_lineno, f.f_code.co_name)
        f = f.f_back
    return None


def _user_frame_of(exc: BaseException) -> str | None:
    """The innermost frame of the model's code in the traceback of ``exc``."""
    frames = [fs for fs in traceback.extract_tb(exc.__traceback__) if _is_user_file(fs.filename)]
    return _describe(frames[-1].filename, frames[-1].lineno, frames[-1].name) if frames else None


# --- tracing with concrete values ------------------------------------------------------------
class _ConcreteProxy(fx.Proxy):
    """A torch.fx proxy that knows its value on the example batch: shape reads (``size``,
    ``shape``, ``dim``, ``len``, unpacking) return python values, so they are constants of the
    trace instead of graph nodes."""

    @property
    def _value(self):
        return self.tracer.values[self.node]

    @property
    def shape(self):
        return self._value.shape

    def size(self, dim=None):
        return self._value.size() if dim is None else self._value.size(dim)

    def dim(self):
        return self._value.dim()

    def ndimension(self):
        return self._value.dim()

    @property
    def ndim(self):
        return self._value.ndim

    def numel(self):
        return self._value.numel()

    def nelement(self):
        return self._value.numel()

    @property
    def dtype(self):
        return self._value.dtype

    @property
    def device(self):
        return self._value.device

    @property
    def is_cuda(self):
        return self._value.is_cuda

    def __len__(self):
        return len(self._value)

    def __iter__(self):
        # chunk/split results and tensors iterate over their first dim, one getitem per part
        return iter([self[i] for i in range(len(self._value))])


class _ExampleError(RuntimeError):
    """An op of the model failed on the example batch while it was traced."""


class _ConcreteTracer(fx.Tracer):
    """torch.fx tracing that also runs each op on the example batch as it is recorded:
    ``values[node]`` is the node's value, ``where[node]`` the line of the model's code that
    called it."""

    def __init__(self, example: torch.Tensor):
        super().__init__()
        self.example = example
        self.values: dict = {}
        self.where: dict = {}
        self._inputs = 0
        self._running = False   # True while an op runs on the example (no tracing then)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        self.where[node] = _user_frame()
        if kind != "output":
            self._running = True
            try:
                with torch.no_grad():
                    self.values[node] = self._run(node)
            except Exception as e:
                raise _ExampleError(f"{type(e).__name__}: {e}") from e
            finally:
                self._running = False
        return node

    # while an op runs on the example, fx's patched nn.Module.__call__ and __getattr__ must act
    # as the originals (run the module with its hooks, return the real parameter)
    def call_module(self, m, forward, args, kwargs):
        if self._running:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._running:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _run(self, node: fx.Node):
        if node.op == "placeholder":
            self._inputs += 1
            return self.example if self._inputs == 1 else (node.args[0] if node.args else None)
        if node.op == "get_attr":
            return functools.reduce(getattr, node.target.split("."), self.root)
        args = fx.node.map_arg(node.args, self.values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self.values.__getitem__)
        if node.op == "call_module":
            return self.root.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


def _trace(model: nn.Module, example: torch.Tensor) -> _ConcreteTracer:
    """Trace ``model`` on ``example``; extra ``forward`` arguments with defaults are fixed to
    their defaults (``forward(self, x, return_features=False)``)."""
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            names = ", ".join(q.name for q in params)
            raise CaptureError(f"{type(model).__name__}.forward takes several inputs ({names}); "
                               f"netquant captures models with one image input")
        concrete[p.name] = p.default
    tracer = _ConcreteTracer(example)
    try:
        tracer.graph = tracer.trace(model, concrete_args=concrete or None)
    except CaptureError:
        raise
    except Exception as e:
        where = _user_frame_of(e)
        if isinstance(e, _ExampleError):
            raise CaptureError(f"{type(model).__name__} fails on the example input of shape {tuple(example.shape)} "
                               f"at {where or 'an unknown line'}: {e}") from e.__cause__
        hint = (" (netquant traces with the example's concrete shapes, so control flow on shapes works; "
                "control flow on tensor values cannot be captured)" if isinstance(e, fx.proxy.TraceError) else "")
        raise CaptureError(f"torch.fx could not trace {type(model).__name__} at {where or 'an unknown line'}: "
                           f"{type(e).__name__}: {e}{hint}") from e
    return tracer


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy().copy()


def _arg(args, kwargs, i: int, key: str, default=None):
    """Argument ``key`` of a call, given by keyword or at position ``i``."""
    return kwargs[key] if key in kwargs else (args[i] if len(args) > i else default)


class _Builder:
    """Maps the traced fx graph, node by node, to netquant Nodes."""

    def __init__(self, tracer: _ConcreteTracer, example: torch.Tensor):
        self.modules = dict(tracer.root.named_modules())
        self.values = tracer.values   # fx node -> its value on the example batch
        self.where = tracer.where     # fx node -> the line of the model's code that made it
        self.example = example
        self.nodes: list[Node] = []
        self.alias: dict = {}      # fx node -> IR name of the tensor it carries
        self.tuples: dict = {}     # fx node (tuple of tensors) -> (IR source name, tuple of index tensors)
        self.used: set = set()
        self.names: dict = {}      # fx node -> its fx name renumbered without the dead code

    # --- helpers --------------------------------------------------------------------------
    def dynamic(self, a) -> bool:
        return isinstance(a, fx.Node) and (a in self.alias or a in self.tuples)

    def const(self, a):
        """The recorded value of a non-dynamic argument (python value or constant tensor)."""
        if isinstance(a, fx.Node):
            return self.values[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.const(x) for x in a)
        if isinstance(a, dict):
            return {k: self.const(v) for k, v in a.items()}
        return a

    def resolve(self, a):
        """``a`` with every non-activation fx node (a size, a buffer, a constant computed from
        them) replaced by its value on the example batch; activations stay fx nodes."""
        if isinstance(a, fx.Node):
            return a if self.dynamic(a) else self.values[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.resolve(x) for x in a)
        if isinstance(a, dict):
            return {k: self.resolve(v) for k, v in a.items()}
        return a

    def module_path(self, n: fx.Node):
        """The path of the module ``n`` calls or runs inside (None in the top-level forward)."""
        if n.op == "call_module":
            return str(n.target)
        stack = n.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1]
            path = path[0] if isinstance(path, tuple) else path
            return str(path) if path else None
        return None

    def fx_name(self, n: fx.Node) -> str:
        """fx's name for ``n`` as if the dead code were not there (see :func:`_renumber`)."""
        return self.names.get(n, n.name)

    def layer_name(self, n: fx.Node) -> str:
        """The module path of the layer ``n`` belongs to (``layer1.0.conv1``; an op inside a custom
        module takes that module's path); for an op in the top-level forward, fx's name for it
        (``relu_1``)."""
        return self.module_path(n) or self.fx_name(n)

    def unique(self, base: str, n: fx.Node) -> str:
        name = base if base not in self.used else f"{base}_{self.fx_name(n)}"
        k = 2
        while name in self.used:   # only for helper nodes of an op that repeats a name
            name, k = f"{base}_{self.fx_name(n)}_{k}", k + 1
        self.used.add(name)
        return name

    def emit(self, n: fx.Node, op: str, inputs, attrs=None, params=None, reason=None, suffix: str = "",
             shape=None) -> str:
        """Append a node for fx node ``n`` (``suffix`` names a helper node made for it, such as
        the broadcast of an operand) and return its name."""
        if op == "float" and attrs["fn"] not in FLOAT_FNS:
            self.fail(n, f"float op {attrs['fn']!r} has no entry in netquant.ir.float_ops.FLOAT_FNS")
        layer = self.layer_name(n)
        shape = tuple(self.values[n].shape[1:]) if shape is None else tuple(shape)
        name = self.unique(layer + suffix, n)
        node = Node(name, op, tuple(inputs), shape, dict(attrs or {}), dict(params or {}), (layer,), reason)
        self.nodes.append(node)
        if not suffix:
            self.alias[n] = node.name
        return node.name

    def inplace(self, n: fx.Node) -> bool:
        """Does ``n`` overwrite its first argument, an activation (``nn.ReLU(inplace=True)``,
        ``F.relu(x, inplace=True)``, ``x.relu_()``, ``x.add_(y)``)?"""
        if not (n.args and isinstance(n.args[0], fx.Node) and n.args[0] in self.alias):
            return False
        return _writes_first_arg(n, self.modules)

    def fail(self, n: fx.Node, what: str):
        where = self.where.get(n)
        at = f" at {where}" if where else ""
        raise CaptureError(f"cannot capture node {n.name!r} (layer {self.layer_name(n)!r}){at}: {what}")

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
            if n.target is not operator.getitem:
                self.fail(n, f"op {n.target!r} on the tuple of tensors that chunk/split/unbind made")
            idx = parts[self.const(n.args[1])]
            if isinstance(idx, list):   # a slice of the parts: still a tuple
                self.tuples[n] = (src_name, idx)
            else:
                self.emit(n, "gather", [src_name], params={"index": idx})
            return
        if n.target is F.pad:
            mode = self.const(_arg(n.args, n.kwargs, 2, "mode", "constant"))
            value = self.const(_arg(n.args, n.kwargs, 3, "value", 0))
            if mode != "constant" or (value or 0) != 0:
                self.fail(n, f"padding with mode {mode!r} and value {value} (only zero padding)")
        out, size = self.index_value(n, src_fx)
        if isinstance(out, (tuple, list)):
            self.tuples[n] = (self.alias[src_fx], [self.to_index(n, o, size) for o in out])
            return
        self.emit(n, "gather", [self.alias[src_fx]], params={"index": self.to_index(n, out, size)})

    def broadcast(self, n: fx.Node, a_fx: fx.Node, tag: str) -> str:
        """The IR name of activation ``a_fx`` expanded to the shape of ``n``'s result (a gather
        made for it when the shapes differ, e.g. SE scales (C, 1, 1) times features (C, H, W))."""
        shape, want = tuple(self.values[a_fx].shape[1:]), tuple(self.values[n].shape[1:])
        if shape == want:
            return self.alias[a_fx]
        ids = torch.arange(1, math.prod(shape) + 1, dtype=torch.int64).reshape(shape)
        try:
            index = torch.broadcast_to(ids, want).reshape(-1).numpy().copy()
        except RuntimeError:
            self.fail(n, f"operand of shape {shape} does not broadcast to {want} within an image")
        return self.emit(n, "gather", [self.alias[a_fx]], params={"index": index}, suffix=f"_{tag}", shape=want)

    # --- ops ------------------------------------------------------------------------------
    def per_channel(self, n, x_val, c, what: str) -> np.ndarray:
        """A constant operand (python number or tensor broadcasting to one image of ``x_val``)
        as one value per channel (dim 1), e.g. a (C, 1, 1) mean or a scalar 2.0."""
        ch = x_val.shape[1]
        c = torch.as_tensor(c, dtype=torch.float64)
        if c.dim() == x_val.dim():
            # a constant with a batch dimension: fine when it is the same for every image
            # (``torch.ones(x.size(0), C, 1, 1)``)
            if not torch.all(c == c[:1]):
                self.fail(n, f"a constant {what} that differs between the images of the batch")
            c = c[0]
        try:
            full = torch.broadcast_to(c, x_val.shape[1:])
        except RuntimeError:
            self.fail(n, f"a constant {what} of shape {tuple(c.shape)} that does not broadcast to "
                         f"{tuple(x_val.shape[1:])} (one image)")
        per_c = full.reshape(ch, -1)
        if not torch.all(per_c == per_c[:, :1]):
            self.fail(n, f"a constant {what} that varies over space (only per-channel constants)")
        return per_c[:, 0].numpy()

    def affine_const(self, n, x_fx, scale, shift) -> None:
        """y = x * scale + shift with constants per channel (dim 1) or scalars."""
        x_val = self.values[x_fx]
        if tuple(self.values[n].shape) != tuple(x_val.shape):
            self.fail(n, f"a constant operand that changes the shape of the activation from "
                         f"{tuple(x_val.shape[1:])} to {tuple(self.values[n].shape[1:])}")
        s = self.per_channel(n, x_val, scale, "factor")
        t = self.per_channel(n, x_val, shift, "term")
        self.emit(n, "affine", [self.alias[x_fx]],
                  params={"scale": s.astype(np.float32), "shift": t.astype(np.float32)})

    def binary(self, n, args, kwargs, kind: str) -> None:
        a, b = args[0], _arg(args, kwargs, 1, "other")
        alpha = kwargs.get("alpha", 1)
        if self.dynamic(a) and self.dynamic(b):
            if kind in ("add", "sub"):
                ia, ib = self.broadcast(n, a, "a"), self.broadcast(n, b, "b")
                if alpha != 1 or kind == "sub":
                    # a - b = a + (-1) * b: the factor is an affine on b, the add stays integer
                    k = -alpha if kind == "sub" else alpha
                    ch = self.values[n].shape[1]
                    ib = self.emit(n, "affine", [ib], params={"scale": np.full(ch, k, np.float32),
                                                              "shift": np.zeros(ch, np.float32)}, suffix="_scale")
                self.emit(n, "add", [ia, ib], {"act": None})
            elif kind == "mul":
                self.emit(n, "float", [self.broadcast(n, a, "a"), self.broadcast(n, b, "b")],
                          {"fn": "mul", "kwargs": {}})
            else:
                self.fail(n, f"{kind} of two activations is not supported")
        elif self.dynamic(a):
            if kind in ("add", "sub"):
                self.affine_const(n, a, 1.0, b * alpha * (1 if kind == "add" else -1))
            elif kind == "mul":
                self.affine_const(n, a, b, 0.0)
            else:
                self.affine_const(n, a, 1.0 / torch.as_tensor(b, dtype=torch.float64), 0.0)
        elif kind in ("add", "sub"):   # constant + alpha * b, constant - alpha * b
            self.affine_const(n, b, alpha * (1 if kind == "add" else -1), a)
        elif kind == "mul":
            self.affine_const(n, b, a, 0.0)
        else:
            self.fail(n, "a constant divided by an activation is not supported")

    def pool(self, n, kind, kernel, stride, padding):
        self.emit(n, kind, [self.alias[_first(n)]], {"kernel": _pair(kernel), "stride": _pair(stride or kernel),
                                                     "padding": _pair(padding)})

    def adaptive(self, n, kind, out_size):
        h, w = self.values[_first(n)].shape[2:]
        oh, ow = _pair(out_size)
        oh, ow = oh or h, ow or w
        if h % oh or w % ow:
            self.fail(n, f"adaptive pooling from {h}x{w} to {oh}x{ow} is not a uniform window")
        k = (h // oh, w // ow)
        self.pool(n, kind, k, k, 0)

    def act(self, n, x_fx, lo, hi) -> None:
        self.emit(n, "act", [self.alias[x_fx]], {"act": (float(lo), float(hi))})

    def conv(self, n, x_fx, weight, bias, stride, padding, dilation, groups, padding_mode="zeros") -> None:
        if padding_mode != "zeros":
            self.fail(n, f"conv padding_mode {padding_mode!r} (only zeros)")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            self.fail(n, "a 2-d convolution whose weight is not a constant 4-d tensor")
        kernel = tuple(weight.shape[2:])
        stride, dilation = _pair(stride), _pair(dilation)
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0, 0)
            elif stride == (1, 1) and all(k % 2 for k in kernel):
                padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
            else:
                self.fail(n, "padding='same' with even kernels or strides")
        bias = bias if bias is not None else torch.zeros(weight.shape[0])
        self.emit(n, "conv", [self.alias[x_fx]],
                  {"stride": stride, "padding": _pair(padding), "dilation": dilation, "groups": int(groups),
                   "act": None},
                  {"weight": _np(weight), "bias": _np(bias)})

    def linear(self, n, x_fx, weight, bias) -> None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            self.fail(n, "a linear layer whose weight is not a constant 2-d tensor")
        if tuple(self.values[n].shape[1:]) != (weight.shape[0],):
            self.fail(n, f"a linear layer applied to an input of shape {tuple(self.values[x_fx].shape[1:])} "
                         f"(netquant's linear layers take a flat vector per image; flatten first)")
        bias = bias if bias is not None else torch.zeros(weight.shape[0])
        self.emit(n, "linear", [self.alias[x_fx]], {"act": None}, {"weight": _np(weight), "bias": _np(bias)})

    def batchnorm(self, n, x_fx, mean, var, weight, bias, eps) -> None:
        if mean is None or var is None:
            self.fail(n, "batch norm without running statistics (track_running_stats=False)")
        c = mean.shape[0]
        weight = torch.ones(c) if weight is None else weight
        bias = torch.zeros(c) if bias is None else bias
        scale = weight.detach().double() / torch.sqrt(var.double() + eps)
        shift = bias.detach().double() - mean.double() * scale
        self.emit(n, "affine", [self.alias[x_fx]], {}, {"scale": _np(scale), "shift": _np(shift)})

    def interpolate(self, n, x_fx, size, scale, mode, align_corners, recompute=None, antialias=False) -> None:
        """Nearest-neighbour resampling only copies elements: a gather (replayed like the other
        moves). Bilinear and bicubic stay float with the output size measured here; area
        resampling by a whole factor is average pooling."""
        h, w = self.values[x_fx].shape[2:]
        oh, ow = self.values[n].shape[2:]
        if mode in ("nearest", "nearest-exact"):
            self.gather(n, x_fx)
        elif mode in ("bilinear", "bicubic"):
            if antialias:
                self.fail(n, f"{mode} resampling with antialias=True")
            if scale is not None and not recompute:
                # torch maps coordinates with 1/scale_factor, not in/out, when a factor is given;
                # they agree only when in * factor is a whole number
                sh, sw = _pair(scale)
                if h * sh != oh or w * sw != ow:
                    self.fail(n, f"{mode} resampling of {h}x{w} by the factor {scale}, which gives no whole size "
                                 f"(pass size= or recompute_scale_factor=True)")
            self.emit(n, "float", [self.alias[x_fx]],
                      {"fn": "interpolate", "kwargs": {"size": (int(oh), int(ow)), "mode": mode,
                                                       "align_corners": bool(align_corners)}})
        elif mode == "area":
            self.adaptive(n, "avgpool", (oh, ow))
        else:
            self.fail(n, f"resampling mode {mode!r} (nearest, bilinear, bicubic and area are supported)")

    def call_module(self, n: fx.Node) -> None:
        m = self.modules[n.target]
        args, kwargs = self.resolve(n.args), self.resolve(n.kwargs)
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not self.dynamic(x):
            self.fail(n, f"module {type(m).__name__} whose first input is not the activation")
        if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)):
            self.alias[n] = self.alias[x]
        elif isinstance(m, nn.Conv2d):
            self.conv(n, x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
        elif isinstance(m, nn.Linear):
            self.linear(n, x, m.weight, m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            self.batchnorm(n, x, m.running_mean, m.running_var, m.weight, m.bias, m.eps)
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
        elif isinstance(m, nn.Upsample):
            self.interpolate(n, x, m.size, m.scale_factor, m.mode, m.align_corners, m.recompute_scale_factor)
        elif isinstance(m, (nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle,
                            nn.ZeroPad2d)):
            self.gather(n, x)
        elif type(m) in _FLOAT_MODULES:
            fn, keys = _FLOAT_MODULES[type(m)]
            self.emit(n, "float", [self.alias[x]], {"fn": fn, "kwargs": {k: getattr(m, k) for k in keys}})
        else:
            self.fail(n, f"module of type {type(m).__name__} is not supported")

    def call_function(self, n: fx.Node) -> None:
        f = n.target  # a function, or a method name for call_method
        args, kwargs = self.resolve(n.args), self.resolve(n.kwargs)
        x = args[0] if args else kwargs.get("input")
        if f in _IDENTITY_FN or f in _IDENTITY_METHOD:
            self.alias[n] = self.alias[x]
        elif f in _CONVERT_METHOD:
            # x.to(x.device), x.float(), x.type_as(y): the identity unless the dtype changes
            if self.values[n].dtype != self.values[x].dtype:
                self.fail(n, f"conversion from {self.values[x].dtype} to {self.values[n].dtype}")
            self.alias[n] = self.alias[x]
        elif f in _ADD:
            self.binary(n, args, kwargs, "add")
        elif f in _SUB:
            self.binary(n, args, kwargs, "sub")
        elif f in _MUL:
            self.binary(n, args, kwargs, "mul")
        elif f in _DIV:
            if kwargs.get("rounding_mode"):
                self.fail(n, f"division with rounding_mode={kwargs['rounding_mode']!r}")
            self.binary(n, args, kwargs, "div")
        elif f in _NEG:
            self.affine_const(n, x, -1.0, 0.0)
        elif f in _RELU:
            self.act(n, x, 0, INF)
        elif f is F.relu6:
            self.act(n, x, 0, 6)
        elif f is F.hardtanh:
            self.act(n, x, _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0))
        elif f in _CLAMP:
            lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
            if isinstance(lo, torch.Tensor) and lo.numel() > 1 or isinstance(hi, torch.Tensor) and hi.numel() > 1:
                self.fail(n, "clamp with tensor bounds (only scalar bounds)")
            self.act(n, x, -INF if lo is None else float(lo), INF if hi is None else float(hi))
        elif f in _CAT:
            tensors = _arg(args, kwargs, 0, "tensors")
            dim = _arg(args, kwargs, 1, "dim", 0)
            rank = self.values[n].dim()
            if dim % rank != 1:
                self.fail(n, f"concatenation along dim {dim} (only channels, dim 1)")
            if not all(self.dynamic(t) for t in tensors):
                self.fail(n, "concatenation with a constant tensor")
            self.emit(n, "concat", [self.alias[t] for t in tensors])
        elif f in _MEAN:
            dims = _arg(args, kwargs, 1, "dim")
            rank = self.values[x].dim()
            if rank != 4 or dims is None or sorted(d % 4 for d in _pair(dims)) != [2, 3]:
                self.fail(n, f"mean over dims {dims} (only the spatial dims 2 and 3)")
            h, w = self.values[x].shape[2:]
            self.pool(n, "avgpool", (h, w), (h, w), 0)
        elif f is F.max_pool2d or f is torch.max_pool2d:
            k = _arg(args, kwargs, 1, "kernel_size")
            s = _arg(args, kwargs, 2, "stride")
            p = _arg(args, kwargs, 3, "padding", 0)
            d = _arg(args, kwargs, 4, "dilation", 1)
            if _pair(d) != (1, 1) or _arg(args, kwargs, 5, "ceil_mode", False) or \
                    _arg(args, kwargs, 6, "return_indices", False):
                self.fail(n, "max pooling with dilation, ceil_mode or return_indices")
            self.pool(n, "maxpool", k, s or k, p)
        elif f is F.avg_pool2d:
            k = _arg(args, kwargs, 1, "kernel_size")
            s = _arg(args, kwargs, 2, "stride")
            p = _arg(args, kwargs, 3, "padding", 0)
            ceil = _arg(args, kwargs, 4, "ceil_mode", False)
            include_pad = _arg(args, kwargs, 5, "count_include_pad", True)
            if ceil or _arg(args, kwargs, 6, "divisor_override") or (not include_pad and _pair(p) != (0, 0)):
                self.fail(n, "average pooling with ceil_mode, divisor_override or count_include_pad=False")
            self.pool(n, "avgpool", k, s or k, p)
        elif f is F.adaptive_avg_pool2d:
            self.adaptive(n, "avgpool", _arg(args, kwargs, 1, "output_size"))
        elif f is F.adaptive_max_pool2d:
            if _arg(args, kwargs, 2, "return_indices", False):
                self.fail(n, "adaptive max pooling with return_indices")
            self.adaptive(n, "maxpool", _arg(args, kwargs, 1, "output_size"))
        elif f in _INTERPOLATE:
            bound = inspect.signature(f).bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            mode = _INTERPOLATE[f] or a.get("mode", "nearest")
            align = True if f is F.upsample_bilinear else a.get("align_corners")
            self.interpolate(n, x, a.get("size"), a.get("scale_factor"), mode, align,
                             a.get("recompute_scale_factor"), a.get("antialias", False))
        elif f is F.conv2d or f is torch.conv2d:
            if self.dynamic(_arg(args, kwargs, 1, "weight")):
                self.fail(n, "a convolution whose weight is an activation")
            self.conv(n, x, _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias"),
                      _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0),
                      _arg(args, kwargs, 5, "dilation", 1), _arg(args, kwargs, 6, "groups", 1))
        elif f is F.linear:
            if self.dynamic(_arg(args, kwargs, 1, "weight")):
                self.fail(n, "a linear layer whose weight is an activation")
            self.linear(n, x, _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias"))
        elif f is F.batch_norm:
            if _arg(args, kwargs, 5, "training", False):
                self.fail(n, "batch norm in training mode")
            self.batchnorm(n, x, _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var"),
                           _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias"),
                           _arg(args, kwargs, 7, "eps", 1e-5))
        elif f in _FLOAT_FN:
            fkw = {}
            if _FLOAT_FN[f] in ("softmax", "log_softmax"):
                fkw["dim"] = _arg(args, kwargs, 1, "dim", 1)
            elif _FLOAT_FN[f] == "leaky_relu":
                fkw["negative_slope"] = _arg(args, kwargs, 1, "negative_slope", 0.01)
            elif _FLOAT_FN[f] == "elu":
                fkw["alpha"] = _arg(args, kwargs, 1, "alpha", 1.0)
            self.emit(n, "float", [self.alias[x]], {"fn": _FLOAT_FN[f], "kwargs": fkw})
        elif f in _MOVES_FN or f in _MOVES_METHOD:
            cand = args[:1] if f in _SHAPE_ONLY_SECOND else list(args) + list(kwargs.values())
            srcs = [a for a in _flatten(cand) if self.dynamic(a)]
            if len(srcs) != 1:
                self.fail(n, "data movement over several activations")
            self.gather(n, srcs[0])
        else:
            name = f if isinstance(f, str) else getattr(f, "__name__", str(f))
            self.fail(n, f"op {name!r} is not supported")

    def build(self, graph: fx.Graph, source: str) -> Graph:
        output = None
        live = _live(graph, self.modules)
        self.names = _renumber(graph, live)
        for n in graph.nodes:
            try:
                if n.op == "placeholder":
                    if self.nodes:
                        if n.args:   # a forward() argument fixed to its default
                            continue
                        self.fail(n, "models with more than one input are not supported")
                    # the input is named after the forward() argument (often "x"); a layer named
                    # "input" (the normalisation of our ResNets) keeps its own name
                    name = n.name
                    self.nodes.append(Node(name, "input", (), tuple(self.example.shape[1:]), {}, {}, (name,)))
                    self.used.add(name)
                    self.alias[n] = name
                elif n.op == "get_attr" or n not in live:
                    continue   # constants (read back by const()), and ops whose results nothing uses
                elif n.op in ("call_module", "call_function", "call_method"):
                    if not any(self.dynamic(a) for a in _flatten([n.args, n.kwargs])) or _metadata(n):
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
                        raise CaptureError(f"the model must return a single tensor (it returns {type(out).__name__}"
                                           f" at {self.where.get(n) or 'forward'})")
                    output = self.alias[out]
            except CaptureError:
                raise
            except Exception as e:   # a case the mapping above did not foresee: still name the line
                self.fail(n, f"{type(e).__name__}: {e}")
        return Graph(tuple(self.nodes), output, source)


def _first(n: fx.Node):
    return n.args[0] if n.args else n.kwargs.get("input")


def _flatten(a) -> list:
    """The leaves of nested lists, tuples and dicts (the fx arguments of a call)."""
    if isinstance(a, (list, tuple)):
        return [y for x in a for y in _flatten(x)]
    if isinstance(a, dict):
        return [y for x in a.values() for y in _flatten(x)]
    return [a]


def _writes_first_arg(n: fx.Node, modules: dict) -> bool:
    """Does call ``n`` write into its first argument (``nn.ReLU(inplace=True)``, ``relu_``,
    ``F.relu(x, inplace=True)``)?"""
    if n.op == "call_module":
        return getattr(modules.get(n.target), "inplace", False) is True
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.endswith("__")
    if n.op != "call_function":
        return False
    if n.target in _INPLACE_FN or n.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(n.target).bind(*n.args, **n.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def _live(graph: fx.Graph, modules: dict) -> set:
    """fx nodes that can affect the output: those it reads, directly or through other nodes,
    and every op that writes into one of its arguments (with what that op reads). The rest
    (an unused ``feat = x.view(x.size(0), -1)``) is dead code, skipped before mapping, so an
    unsupported op in it does not stop the capture."""
    live: set = set()
    todo = [n for n in graph.nodes if n.op == "output" or _writes_first_arg(n, modules)]
    while todo:
        n = todo.pop()
        if n in live:
            continue
        live.add(n)
        todo.extend(a for a in _flatten([n.args, n.kwargs]) if isinstance(a, fx.Node))
    return live


def _renumber(graph: fx.Graph, live: set) -> dict:
    """The names fx would have given the live nodes of ``graph`` had the dead ones not been
    there: fx numbers repeats of a name in order (``relu``, ``relu_1``, ``relu_2``), so an unused
    ``F.relu`` early in forward would shift the names of every later one. Top-level ops are
    named by these (``conv2_relu_1``), so a net with dead code gets the names of the net without."""
    names, count = {}, {}
    for n in graph.nodes:
        if n in live or n.op == "placeholder":
            base = re.sub(r"_\d+$", "", n.name)
            k = count.get(base, 0)
            count[base] = k + 1
            names[n] = base if k == 0 else f"{base}_{k}"
    return names


def _metadata(n: fx.Node) -> bool:
    """Does ``n`` read only the shape of a tensor (``x.size(0)``, ``x.shape``, ``x.dim()``) or
    make a constant from it (``x.new_zeros(...)``, ``torch.zeros_like(x)``)? The value recorded
    on the example batch is then a constant of the graph."""
    if n.op == "call_method":
        return n.target in _METADATA_METHOD
    return n.op == "call_function" and (n.target in _METADATA_FN or (
        n.target is getattr and len(n.args) == 2 and n.args[1] in _METADATA_ATTR))


def capture(model: nn.Module, example: torch.Tensor | None = None, optimize_graph: bool = True) -> Graph:
    """Trace ``model`` (in eval mode) into a Graph; fold batch norms and fuse activations unless
    ``optimize_graph`` is False (ops whose results never reach the output are dropped either
    way). ``example``: an input batch (default: 2 CIFAR-sized images) that declares the input
    shape; the graph must compute what the model computes on it (else a CaptureError)."""
    if model.training:
        raise CaptureError(f"{type(model).__name__} is in training mode; call model.eval() first")
    if example is None:
        example = torch.rand(2, 3, 32, 32)
    if example.dim() != 4:
        raise CaptureError(f"example input must be NCHW, got shape {tuple(example.shape)}")
    # two images, so a data movement that mixes images of a batch shows in the replay
    example = example[:1].repeat(2, 1, 1, 1) if example.shape[0] != 2 else example
    tracer = _trace(model, example.clone())
    graph = _Builder(tracer, example).build(tracer.graph, type(model).__name__)
    if not any(n.op in WEIGHTED_OPS for n in graph.nodes):
        raise CaptureError(f"{type(model).__name__} has no conv or fully connected layer to quantize")
    graph = remove_dead(graph)
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
