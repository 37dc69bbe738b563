"""The graph passes of netquant/ir/passes.py one at a time, on small graphs built by hand: what
each pass merges or drops, what it must leave alone, and that the float function is unchanged
(the float executor on the graph before and after, on seeded random inputs)."""
import numpy as np
import pytest
import torch

from netquant.ir.float_exec import run_float
from netquant.ir.graph import Graph, Node, identity_index
from netquant.ir.passes import fold_batchnorm, fuse_activations, merge_affines, merge_gathers, remove_dead

RELU = (0.0, np.inf)
CONV = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, act=None)
# the same function in float32 computed in another order (folded weights, merged affines): a few
# float32 ulps (1.2e-7) of the largest output; measured 2.5e-7 on the folded conv + linear below
FLOAT_ORDER_RTOL = 1e-6


def _rng(seed=0):
    return np.random.default_rng(seed)


def _conv(name, src, cin, cout, rng, **attrs):
    w = {"weight": rng.normal(size=(cout, cin, 3, 3)).astype(np.float32),
         "bias": rng.normal(size=cout).astype(np.float32)}
    return Node(name, "conv", (src,), (cout, 4, 4), {**CONV, **attrs}, w, (name,))


def _affine(name, src, shape, rng, scale=None):
    c = shape[0]
    s = rng.uniform(0.5, 2.0, c).astype(np.float32) if scale is None else scale
    return Node(name, "affine", (src,), shape, {}, {"scale": s, "shift": rng.normal(size=c).astype(np.float32)},
                (name,))


def _same_function(a: Graph, b: Graph, shape, rtol=0.0):
    """``a`` and ``b`` give the same outputs on 3 seeded random inputs, within ``rtol`` of the
    largest output (0: bit for bit)."""
    x = torch.from_numpy(_rng(9).normal(size=(3, *shape)).astype(np.float32))
    ya, yb = run_float(a, x, keep=())[a.output], run_float(b, x, keep=())[b.output]
    assert ya.shape == yb.shape
    worst = float((ya - yb).abs().max())
    assert worst <= rtol * float(ya.abs().max()), worst


def test_remove_dead_pass():
    w = {"weight": np.ones((2, 3, 1, 1), np.float32), "bias": np.zeros(2, np.float32)}
    conv = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, act=None)
    nodes = (Node("x", "input", (), (3, 4, 4)),
             Node("c", "conv", ("x",), (2, 4, 4), conv, w),
             Node("unused", "gather", ("c",), (32,), {}, {"index": np.arange(1, 33)}),
             Node("unused2", "act", ("unused",), (32,), {"act": (0.0, np.inf)}),
             Node("r", "act", ("c",), (2, 4, 4), {"act": (0.0, np.inf)}))
    g = remove_dead(Graph(nodes, "r"))
    assert g.names() == ["x", "c", "r"]
    assert remove_dead(g) is g
    _same_function(Graph(nodes, "r"), g, (3, 4, 4))
    # the input stays even when the output does not read it
    assert remove_dead(Graph(nodes, "x")).names() == ["x"]


def test_merge_affines_composes_scale_and_shift():
    """affine(affine(x)): scale s1*s2, shift t1*s2 + t2. Worked number: s1 = 2, t1 = 1, s2 = 3,
    t2 = -1 give 3 * (2x + 1) - 1 = 6x + 2."""
    rng = _rng()
    a = Node("a", "affine", ("x",), (2, 4, 4), {}, {"scale": np.float32([2, 0.5]), "shift": np.float32([1, 0])}, ("a",))
    b = Node("b", "affine", ("a",), (2, 4, 4), {}, {"scale": np.float32([3, 4]), "shift": np.float32([-1, 1])}, ("b",))
    tail = _conv("c", "b", 2, 3, rng)
    g = Graph((Node("x", "input", (), (2, 4, 4)), a, b, tail), "c")
    m = merge_affines(g)
    assert m.names() == ["x", "a", "c"] and m.node("c").inputs == ("a",)
    merged = m.node("a")
    assert merged.layers == ("a", "b")
    np.testing.assert_array_equal(merged.params["scale"], [6, 2])
    np.testing.assert_array_equal(merged.params["shift"], [2, 1])
    _same_function(g, m, (2, 4, 4), FLOAT_ORDER_RTOL)
    # an affine read by two nodes is not merged into either
    two = Graph((Node("x", "input", (), (2, 4, 4)), a, b, tail, _conv("d", "a", 2, 3, rng)), "c")
    assert merge_affines(two).names() == two.names()


def test_fold_batchnorm_matches_the_unfused_graph():
    """conv -> batch norm (an affine per output channel) folds into the conv's weights and bias;
    the folded graph computes the unfused one's outputs up to float32 summation order."""
    rng = _rng(1)
    conv = _conv("conv1", "x", 3, 4, rng)
    bn = _affine("bn1", "conv1", (4, 4, 4), rng)
    head = Node("fc", "linear", ("bn1",), (5,), {"act": None},
                {"weight": rng.normal(size=(5, 64)).astype(np.float32), "bias": rng.normal(size=5).astype(np.float32)},
                ("fc",))
    fc_bn = _affine("bn2", "fc", (5,), rng)
    g = Graph((Node("x", "input", (), (3, 4, 4)), conv, bn, head, fc_bn), "bn2")
    f = fold_batchnorm(g)
    assert f.names() == ["x", "conv1", "fc"] and f.output == "fc"
    assert f.node("conv1").layers == ("conv1", "bn1") and f.node("fc").layers == ("fc", "bn2")
    s = bn.params["scale"]
    np.testing.assert_allclose(f.node("conv1").params["weight"], conv.params["weight"] * s[:, None, None, None],
                               rtol=1e-6)
    np.testing.assert_allclose(f.node("conv1").params["bias"], conv.params["bias"] * s + bn.params["shift"], rtol=1e-6)
    _same_function(g, f, (3, 4, 4), FLOAT_ORDER_RTOL)


def test_fold_batchnorm_leaves_what_it_cannot_fold():
    """Not folded: an affine after a conv that already has its activation (the clamp comes
    first), an affine whose channels are not the conv's outputs, an affine with another reader
    of the conv, and an affine after the input (the input normalisation)."""
    rng = _rng(2)
    x = Node("x", "input", (), (3, 4, 4))
    relu_conv = _conv("c", "x", 3, 4, rng, act=RELU)
    g1 = Graph((x, relu_conv, _affine("bn", "c", (4, 4, 4), rng)), "bn")
    assert fold_batchnorm(g1).names() == ["x", "c", "bn"]
    conv = _conv("c", "x", 3, 4, rng)
    g2 = Graph((x, conv, _affine("bn", "c", (4, 4, 4), rng), _conv("d", "c", 4, 2, rng),
                Node("add", "add", ("bn", "bn"), (4, 4, 4), {"act": None})), "add")
    assert "bn" in fold_batchnorm(g2).names()
    g3 = Graph((x, _affine("norm", "x", (3, 4, 4), rng), _conv("c", "norm", 3, 4, rng)), "c")
    assert fold_batchnorm(g3).names() == ["x", "norm", "c"]


def test_fuse_activations_into_conv_linear_and_add():
    """A lone clamp after conv, linear or add becomes the layer's ``act`` and its name is
    appended (MATLAB's naming: conv1_relu1); one after a maxpool, or after a layer that already
    has an activation, stays a node of its own."""
    rng = _rng(3)
    x = Node("x", "input", (), (3, 4, 4))
    c1 = _conv("conv1", "x", 3, 4, rng)
    r1 = Node("relu1", "act", ("conv1",), (4, 4, 4), {"act": RELU}, layers=("relu1",))
    c2 = _conv("conv2", "relu1", 4, 4, rng)
    add = Node("add", "add", ("conv2", "relu1"), (4, 4, 4), {"act": None}, layers=("add",))
    r2 = Node("relu2", "act", ("add",), (4, 4, 4), {"act": (0.0, 6.0)}, layers=("relu2",))
    pool = Node("pool", "maxpool", ("relu2",), (4, 2, 2), {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0)},
                layers=("pool",))
    r3 = Node("relu3", "act", ("pool",), (4, 2, 2), {"act": RELU}, layers=("relu3",))
    again = Node("clip", "act", ("relu3",), (4, 2, 2), {"act": (0.0, 1.0)}, layers=("clip",))
    g = Graph((x, c1, r1, c2, add, r2, pool, r3, again), "clip")
    f = fuse_activations(g)
    assert f.names() == ["x", "conv1_relu1", "conv2", "add_relu2", "pool", "relu3", "clip"]
    assert f.node("conv1_relu1").attrs["act"] == RELU and f.node("conv1_relu1").layers == ("conv1", "relu1")
    assert f.node("add_relu2").attrs["act"] == (0.0, 6.0) and f.node("add_relu2").inputs == ("conv2", "conv1_relu1")
    assert f.node("conv2").inputs == ("conv1_relu1",) and f.node("pool").inputs == ("add_relu2",)
    _same_function(g, f, (3, 4, 4))


def test_merge_gathers_composes_indices_and_drops_identities():
    """gather(gather(x)) is one gather: b reads a's element ib - 1, a reads x's element ia - 1,
    0 writes zero. Worked numbers: x = [x1..x4], a = [x4, 0, x2] (ia = 4, 0, 2), b reads
    a's 3rd, 1st and 2nd (ib = 3, 1, 2): [x2, x4, 0], composed index 2, 4, 0. An identity
    gather that keeps the shape disappears; one that reshapes (a flatten) stays."""
    x = Node("x", "input", (), (4,))
    a = Node("a", "gather", ("x",), (3,), {}, {"index": np.array([4, 0, 2])}, ("a",))
    b = Node("b", "gather", ("a",), (3,), {}, {"index": np.array([3, 1, 2])}, ("b",))
    out = Node("out", "act", ("b",), (3,), {"act": (-10.0, 10.0)}, layers=("out",))
    g = Graph((x, a, b, out), "out")
    m = merge_gathers(g)
    assert m.names() == ["x", "a", "out"] and m.node("out").inputs == ("a",)
    np.testing.assert_array_equal(m.node("a").params["index"], [2, 4, 0])
    assert m.node("a").layers == ("a", "b")
    _same_function(g, m, (4,))
    # identities: the one that keeps the shape goes, the flatten (4,1,1) -> (4,) stays
    sq = Node("sq", "input", (), (4, 1, 1))
    same = Node("same", "gather", ("sq",), (4, 1, 1), {}, {"index": identity_index(4)}, ("same",))
    user = Node("user", "act", ("same",), (4, 1, 1), {"act": RELU}, layers=("user",))
    assert merge_gathers(Graph((sq, same, user), "user")).names() == ["sq", "user"]
    flat = Node("flat", "gather", ("sq",), (4,), {}, {"index": identity_index(4)}, ("flat",))
    user = Node("user", "act", ("flat",), (4,), {"act": RELU}, layers=("user",))
    assert merge_gathers(Graph((sq, flat, user), "user")).names() == ["sq", "flat", "user"]


@pytest.mark.parametrize("p", [remove_dead, merge_affines, fold_batchnorm, fuse_activations, merge_gathers])
def test_a_pass_with_nothing_to_do_returns_an_equal_graph(p):
    rng = _rng(4)
    g = Graph((Node("x", "input", (), (3, 4, 4)), _conv("c", "x", 3, 4, rng, act=RELU)), "c")
    out = p(g)
    assert out.names() == g.names() and out.node("c") is g.node("c")
