"""Capture of CNNs written the way published code writes them (tests/zoo.py).

Every zoo net (random weights, measured batch-norm statistics) must capture, and the captured
float graph must compute what the torch model computes: within ``FLOAT_TOL`` = 1e-4 of the
largest |score|, on real CIFAR-10 test images and on random inputs of another batch size. Only
float rounding separates them (batch-norm folding changes the summation; measured below 2e-6
relative); a lost shortcut, a mis-ordered shuffle or a wrong resampling is off by 1e-2 or more.
"""
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402

from netquant.data.transforms import to_float  # noqa: E402
from netquant.ir.capture import CaptureError, capture  # noqa: E402
from netquant.ir.float_exec import run_float  # noqa: E402

FLOAT_TOL = 1e-4   # relative to max |score|: see the module docstring
CIFAR_IMAGES = 8   # real test images per net: enough to show a wrong graph, fast on 2 cores


def max_rel_err(model, graph, x):
    with torch.no_grad():
        want = model(x.clone())
    got = run_float(graph, x, keep=())[graph.output]
    assert got.shape == want.shape
    return float((want - got).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def images(cifar):
    return torch.from_numpy(to_float(cifar.test.images[:CIFAR_IMAGES]))


# --- the zoo -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", zoo.ARCHITECTURES + zoo.EXTRAS)
def test_zoo_net_captures_and_matches_torch(name, images):
    model = zoo.make(name)
    graph = capture(model)
    assert max_rel_err(model, graph, images) <= FLOAT_TOL
    # another batch size than the example's 2: sizes read from x.size(0) must not be baked in
    rand = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert max_rel_err(model, graph, rand) <= FLOAT_TOL
    # no dead nodes: every node but the output is read by another
    read = {i for n in graph.nodes for i in n.inputs}
    assert all(n.name in read for n in graph.nodes if n.name != graph.output), graph
    # layer names are the model's module paths (or fx's names of top-level ops)
    modules = dict(model.named_modules())
    for n in graph.nodes:
        if n.op in ("conv", "linear"):
            assert n.layers[0] in modules and isinstance(modules[n.layers[0]], (nn.Conv2d, nn.Linear)), n
    # batch norm is folded: no affine is left (no zoo net has a lone batch norm)
    assert not [n for n in graph.nodes if n.op == "affine"], graph


def test_zoo_is_deterministic_with_real_batchnorm_statistics():
    state = torch.random.get_rng_state()
    a, b = zoo.make("resnet_b", seed=3), zoo.make("resnet_b", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)   # the caller's RNG is untouched
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.conv1.weight, zoo.make("resnet_b", seed=4).conv1.weight)
    bn = a.bn1
    assert not a.training and bn.running_mean.abs().min() > 0 and (bn.running_var - 1).abs().max() > 0.05
    assert (bn.weight - 1).abs().max() > 0.05 and bn.bias.abs().max() > 0.05
    with pytest.raises(ValueError, match="unknown zoo net 'resnet'"):
        zoo.make("resnet")


def test_dead_code_gives_the_graph_of_the_net_without_it():
    dead = zoo.make("dead_ops")
    clean = zoo.TinyResNet()
    clean.load_state_dict(dead.state_dict())
    gd, gc = capture(dead), capture(clean.eval())
    assert [(n.name, n.op, n.inputs, n.shape, n.layers) for n in gd.nodes] == \
           [(n.name, n.op, n.inputs, n.shape, n.layers) for n in gc.nodes]
    for a, b in zip(gd.nodes, gc.nodes):
        assert a.params.keys() == b.params.keys() and all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    # also without the optimizing passes: the dead view/flatten/relu never become nodes
    raw = capture(dead, optimize_graph=False)
    assert [n.op for n in raw.nodes] == [n.op for n in capture(clean, optimize_graph=False).nodes]


# --- resampling ---------------------------------------------------------------------------------
def test_nearest_upsampling_is_an_exact_gather_and_bilinear_stays_float(images):
    model = zoo.make("upsample")
    g = capture(model, optimize_graph=False)
    up = g.find_layer("up")
    assert up.op == "gather" and up.shape == (16, 8, 8)
    # F.interpolate(x, size=(H, W), mode="nearest") in _upsample_add: a gather too
    assert [n.op for n in g.nodes if n.layers == ("interpolate",)] == ["gather"]
    bil = [n for n in g.nodes if n.op == "float"]
    assert len(bil) == 1 and bil[0].attrs == {"fn": "interpolate", "kwargs": {
        "size": (32, 32), "mode": "bilinear", "align_corners": False}}
    # the gather is exact: bit for bit torch's nearest upsampling of the same values
    vals = run_float(g, images)
    want = F.interpolate(vals[up.inputs[0]], scale_factor=2, mode="nearest")
    assert torch.equal(vals[up.name], want)


class Resample(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.kwargs = kwargs
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = F.interpolate(self.conv(x), **self.kwargs)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("kwargs, op", [
    (dict(scale_factor=3, mode="nearest"), "gather"),
    (dict(size=(24, 20), mode="nearest"), "gather"),     # not a whole factor: still only copies
    (dict(scale_factor=2, mode="bilinear", align_corners=True), "float"),
    (dict(size=(20, 24), mode="bicubic", align_corners=False), "float"),
    (dict(size=(8, 4), mode="area"), "avgpool"),
])
def test_resampling_modes(kwargs, op):
    model = Resample(**kwargs).eval()
    g = capture(model, optimize_graph=False)
    assert [n.op for n in g.nodes if n.layers == ("interpolate",)] == [op]
    assert max_rel_err(model, g, torch.rand(3, 3, 32, 32)) <= FLOAT_TOL


def test_bilinear_by_a_factor_that_gives_no_whole_size_is_refused():
    # 16 * 1.3 = 20.8: torch maps coordinates by 1/1.3, not 16/20, so a size-based float op would differ
    with pytest.raises(CaptureError, match="factor 1.3"):
        capture(Resample(scale_factor=1.3, mode="bilinear").eval())


# --- published idioms ---------------------------------------------------------------------------
class ShapeIdioms(nn.Module):
    """Shape reads everywhere, control flow on shapes, len(), iteration over chunks, and an
    extra forward argument with a default."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 1, 1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x, return_features=False):
        if x.size(1) == 3 and x.dim() == 4:        # shape control flow: traced with the example's sizes
            x = self.conv(x)
        n, c, h, w = x.shape
        parts = [p * 2.0 for p in x.chunk(2, dim=1)]
        x = torch.cat(parts, dim=1)
        x = F.max_pool2d(x, kernel_size=x.shape[-1] // 4)
        x = x.reshape(len(x), c * (h // 8) * (w // 8))
        if return_features:
            return x
        return self.fc(x)


def test_shape_reads_and_shape_control_flow_capture():
    model = ShapeIdioms().eval()
    g = capture(model)
    assert max_rel_err(model, g, torch.rand(5, 3, 32, 32)) <= FLOAT_TOL
    pool = next(n for n in g.nodes if n.op == "maxpool")
    assert pool.attrs["kernel"] == (8, 8) and pool.attrs["stride"] == (8, 8)


class Arithmetic(nn.Module):
    """Two-activation sub, broadcast add of a (C, 1, 1) activation, constants on either side."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 1, 1)
        self.b = nn.Conv2d(3, 8, 3, 1, 1)
        self.fc = nn.Linear(8, 10)
        self.register_buffer("mean", torch.linspace(-1, 1, 8).view(1, 8, 1, 1))

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = a - b
        y = y + F.adaptive_avg_pool2d(b, 1)       # (8, 1, 1) broadcast over (8, 32, 32)
        y = 1.0 - torch.sigmoid(y) * 0.5
        y = -(y - self.mean) / 2.0 + torch.ones(x.size(0), 8, 1, 1)
        return self.fc(y.mean([2, 3]))


def test_arithmetic_between_activations_and_constants():
    model = Arithmetic().eval()
    g = capture(model, optimize_graph=False)
    assert max_rel_err(model, g, torch.rand(3, 3, 32, 32)) <= FLOAT_TOL
    adds = [n for n in g.nodes if n.op == "add"]
    assert len(adds) == 2
    # the broadcast operand is expanded by an exact gather, so the add sees equal shapes
    assert all(g.node(i).shape == (8, 32, 32) for n in adds for i in n.inputs)


# --- errors name the line of the user's code -------------------------------------------------
def _line_of(cls, text: str) -> str:
    lines, start = inspect.getsourcelines(cls.forward)
    return f"{Path(__file__).name}:{start + next(i for i, l in enumerate(lines) if text in l)}"


class ValueControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:   # depends on the pixels: cannot be one graph
            x = x * 2
        return x.mean([2, 3])


class UnsupportedOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x = self.conv(x)
        x = torch.cumsum(x, dim=1)
        return x.mean([2, 3])


class UnsupportedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x):
        return self.norm(self.conv(x)).mean([2, 3])


@pytest.mark.parametrize("cls, text, what", [
    (ValueControlFlow, "if x.sum() > 0", "control flow"),
    (UnsupportedOp, "torch.cumsum(x, dim=1)", "'cumsum' is not supported"),
    (UnsupportedModule, "self.norm(self.conv(x))", "GroupNorm is not supported"),
])
def test_capture_errors_name_the_file_and_line(cls, text, what):
    with pytest.raises(CaptureError) as err:
        capture(cls().eval())
    msg = str(err.value)
    assert _line_of(cls, text) in msg and text in msg and what in msg, msg


def test_forward_with_two_inputs_is_refused():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x, y):
            return self.conv(x) + self.conv(y)

    with pytest.raises(CaptureError, match=r"forward takes several inputs \(x, y\)"):
        capture(TwoInputs().eval())


def test_a_model_that_fails_on_the_example_names_the_line():
    # LeNet's x.view(-1, 16 * 5 * 5) holds only for 32x32 inputs
    with pytest.raises(CaptureError) as err:
        capture(zoo.make("lenet"), torch.rand(2, 3, 64, 48))
    msg = str(err.value)
    lines, start = inspect.getsourcelines(zoo.LeNet.forward)
    line = start + next(i for i, l in enumerate(lines) if "x.view(-1, 16 * 5 * 5)" in l)
    assert "fails on the example input of shape (2, 3, 64, 48)" in msg and f"zoo.py:{line}" in msg, msg
    # the shape is the example's: the same net captures 64x48 inputs when its code allows them
    g = capture(zoo.make("resnet_a"), torch.rand(2, 3, 64, 48))
    assert g.input.shape == (3, 64, 48) and next(n for n in g.nodes if n.op == "avgpool").attrs["kernel"] == (12, 12)
