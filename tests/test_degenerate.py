"""Degenerate channels and tensors quantize with no manual step (docs/NUMERICS.md, "Scale floors"):
an all-zero output channel, a channel pruned to weights near zero (the ShuffleNetV2 case that made
the bias overflow int32), dead ReLUs (a channel, and a whole branch whose output is always 0), and
a layer that truly cannot be quantized, which stays float with its reason instead of raising."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import fresh_copy
from netquant.calib.calibrate import weight_stats
from netquant.data.transforms import to_float
from netquant.ir.float_exec import run_float
from netquant.metrics import agreement
from netquant.models.resnet import ImageInput
from netquant.quant import numerics as nx
from netquant.quant.config import TARGETS
from netquant.quant.lower import CANNOT, weight_scales
from netquant.quantizer import Quantizer
from netquant.ref.fakequant import layerwise_lsb


# --- the floor math ---------------------------------------------------------------------------
def test_weight_scale_floor_worked_example():
    """The docstring's numbers: a pruned channel (weights 1e-12, bias 0.05) next to a channel of
    range 0.3, input scale 0.02, uint8 input."""
    w = np.zeros((3, 4, 3, 3))
    w[0] = np.linspace(-0.3, 0.3, 36).reshape(4, 3, 3)
    w[1] = 1e-12
    # w[2]: all zero, with bias 0
    b = np.array([0.1, 0.05, 0.0])
    raw = np.array([0.3 / 127, 1e-12 / 127, 0.0])
    assert 0.05 / (0.02 * raw[1]) > 2 ** 31          # unfloored, the bias would not fit int32
    s = nx.floor_weight_scales(raw, w, b, 0.02, 255)
    assert s[0] == raw[0]                                # a healthy channel is untouched
    assert s[1] == s[2] == pytest.approx(0.3 / 127 * 2 ** -16) == pytest.approx(3.6044e-8, rel=1e-4)
    bq = nx.quantize_bias(b, 0.02 * s, "layer")
    wq = nx.quantize_weights(w, s)
    assert bq[1] == 69_358_933 and bq[2] == 0
    assert not wq[1].any() and not wq[2].any()          # 1e-12 / 3.6e-8 rounds to 0
    assert abs(bq[1] * 0.02 * s[1] - 0.05) <= 0.5 * 0.02 * s[1]   # the bias is exact to half a step
    # per tensor: one scale, the largest floored one
    assert np.all(nx.floor_weight_scales(np.full(3, 0.3 / 127), w, b, 0.02, 255, per_tensor=True) == 0.3 / 127)


def test_bias_floor_keeps_bias_and_accumulator_in_int32():
    """A bias far larger than the weights' range raises the channel's scale just enough: the int32
    bias plus the weights' share of the accumulator bound stays below 2^31."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 64, 3, 3)) * 0.05
    b = np.array([0.1, -3.0e4, 2.0e5, 0.0])
    s_x = 0.01
    raw = np.abs(w).reshape(4, -1).max(1) / 127
    s = nx.floor_weight_scales(raw, w, b, s_x, 255)
    assert s[0] == raw[0] and s[3] == raw[3] and s[1] > raw[1] and s[2] > raw[2]
    wq = nx.quantize_weights(w, s)
    bq = nx.quantize_bias(b, s_x * s, "layer")
    assert nx.accumulator_bound(wq, 255, bq).max() < 2 ** 31
    assert np.all(np.abs(bq * s_x * s - b) <= 0.5 * s_x * s)
    # a layer with no weights and no bias at all takes 1/127 (any scale represents zero)
    assert np.all(nx.floor_weight_scales(np.zeros(2), np.zeros((2, 3)), np.zeros(2), s_x, 255) == 1 / 127)
    # weights that alone can reach 2^31 in the accumulator: no scale floor helps, a clear error
    big = np.ones((1, 70_000))
    with pytest.raises(ValueError, match="weights alone reach the int32 accumulator bound 2\\^31"):
        nx.floor_weight_scales(np.array([1 / 127]), big, np.zeros(1), s_x, 255)


def test_all_zero_weights_give_zero_raw_scales():
    w = np.zeros((2, 3, 1, 1))
    w[0] = 0.5
    assert weight_scales(w, TARGETS["gpu"], "layer").tolist() == [0.5 / 127, 0.0]


# --- a trained network with degenerate channels ----------------------------------------------
class DegenerateNet(nn.Module):
    """conv-bn-relu, a stride-2 conv-bn-relu plus a 1x1 side branch with its own ReLU, a third
    conv, pooling and a classifier, with degenerate channels built in (per-channel constants that
    capture folds into the weights and biases), so training works around them:

    - conv1 channel 0 is multiplied by 0 before and after its batch norm: weights and bias 0;
    - conv1 channel 1 has 1000 subtracted before its ReLU: a dead ReLU channel;
    - conv2 channel 1 is multiplied by 1e-12 before its batch norm: near-zero weights and a bias
      that is large next to them (the pruned ShuffleNetV2 channel that overflowed int32);
    - the side branch's bias starts at -1000: its ReLU output is always 0 (a dead tensor);
    - conv3 channel 2 is multiplied by 0 and shifted by 0.25: weights 0, a constant channel.
    """

    def __init__(self):
        super().__init__()
        self.input = ImageInput()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.side = nn.Conv2d(16, 32, 1, 2)
        self.conv3 = nn.Conv2d(32, 32, 3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():  # dead from the start, so no gradient ever reaches it
            self.side.bias.fill_(-1e3)

        def channel(c, index, value, rest=1.0):
            v = torch.full((1, c, 1, 1), rest)
            v[0, index] = value
            return v

        self.register_buffer("zero1", channel(16, 0, 0.0))
        self.register_buffer("kill1", channel(16, 1, 1e3, 0.0))
        self.register_buffer("tiny2", channel(32, 1, 1e-12))
        self.register_buffer("zero3", channel(32, 2, 0.0))
        self.register_buffer("const3", channel(32, 2, 0.25, 0.0))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(self.input(x)) * self.zero1) * self.zero1 - self.kill1)
        y = F.relu(self.bn2(self.conv2(x) * self.tiny2)) + F.relu(self.side(x))
        y = F.relu(self.conv3(y) * self.zero3 + self.const3)
        return self.fc(torch.flatten(self.pool(y), 1))


@pytest.fixture(scope="module")
def degenerate(cifar):
    from test_architectures import train

    torch.manual_seed(0)
    model = train(DegenerateNet(), cifar, images=1000, epochs=2)   # trained weights and BN statistics;
    # the degenerate channels come from the construction, not the training
    q = Quantizer(model)
    table = q.calibrate(cifar.train.images[:200])
    return model, q, table


def test_the_captured_network_is_degenerate(degenerate):
    """What the quantizer sees after batch-norm folding: the degenerate parameters listed in
    DegenerateNet's docstring."""
    _, q, _ = degenerate
    c1, c2, c3 = (q.graph.node(n).params for n in ("conv1_relu", "conv2_relu_1", "conv3_relu_3"))
    assert not c1["weight"][0].any() and c1["bias"][0] == 0
    assert c1["bias"][1] < -900
    assert 0 < np.abs(c2["weight"][1]).max() < 1e-8 and abs(c2["bias"][1]) > 1e-3
    assert not c3["weight"][2].any() and c3["bias"][2] == np.float32(0.25)
    assert q.ranges["side_relu_2"].max == 0 and q.ranges["side_relu_2"].min == 0


def test_degenerate_channels_quantize_with_no_manual_step(degenerate, cifar):
    model, q, table = degenerate
    qg = q.quantize().qgraph
    # every layer is integer: nothing fell back to float, nothing needed set_quantize
    for n in qg.nodes:
        if n.op in ("input", "dequantize") or (n.op == "affine" and qg.node(n.inputs[0]).op == "input"):
            continue
        assert n.quantized, (n, n.reason)
    rows = table[table.Quantize]
    assert len(rows) and not rows.Scale.isna().any() and (rows.Scale > 0).all()
    assert not table.Reason.str.contains(CANNOT).any()

    # the pruned channel: unfloored its bias would overflow int32; now the weights are 0 and the
    # bias is exact
    conv2 = qg.node("conv2_relu_1")
    src = qg.node(conv2.inputs[0])
    w = q.graph.node("conv2_relu_1").params
    raw = np.abs(w["weight"][1]).max() / 127
    assert abs(w["bias"][1]) / (src.scale * raw) > 2 ** 31
    assert not conv2.params["weight"][1].any()
    s_b = src.scale * conv2.params["weight_scale"][1]
    assert abs(conv2.params["bias"][1] * s_b - w["bias"][1]) <= 0.5 * s_b
    # the all-zero channel stores 0 and 0; the constant channel stores weights 0 and its bias
    conv1 = qg.node("conv1_relu")
    assert not conv1.params["weight"][0].any() and conv1.params["bias"][0] == 0
    conv3 = qg.node("conv3_relu_3")
    assert not conv3.params["weight"][2].any() and conv3.params["bias"][2] > 0
    # the dead branch: its output is always 0, scale 1/255, and it stays 0 in integers
    dead = q.ranges["side_relu_2"]
    assert dead.max == 0 and dead.min == 0
    assert qg.node("side_relu_2").scale == pytest.approx(1 / 255)
    for n in qg.nodes:
        if n.op in ("conv", "linear", "add", "avgpool"):
            assert np.all(n.params["shift"] >= 1) and np.all(n.params["shift"] <= nx.MAX_SHIFT), n.name
            assert np.all(n.params["multiplier"] >= 0), n.name

    x = to_float(cifar.test.images[:500])
    labels = cifar.test.labels[:500]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    scores = q.quantize().run(x)
    f1, i1 = 100 * (ref.argmax(1) == labels).mean(), 100 * (scores.argmax(1) == labels).mean()
    agree = agreement(ref, scores)
    lsb = layerwise_lsb(qg, torch.from_numpy(x[:50]))
    print(f"\ndegenerate net: float top-1 {f1:.1f}%, int8 {i1:.1f}%, agreement {agree:.1f}%, "
          f"max {max(lsb.values())} LSB from fake-quant")
    assert f1 > 20, "the network did not learn"
    # the floors of tests/test_architectures.py: top-1 agreement of float and int8 >= 93% on 500
    # test images (networks trained for seconds have many near ties); top-1 within 2 points
    assert agree >= 93.0
    assert abs(f1 - i1) <= 2.0
    assert max(lsb.values()) <= 1, {k: v for k, v in lsb.items() if v > 1}


def test_degenerate_channels_with_power_of_two_scales(degenerate, cifar):
    """MATLAB's scheme (per-tensor power-of-two scales) on the same network: the floors hold
    after rounding the scales up, and nothing falls back to float."""
    q = fresh_copy(degenerate[1])   # the module's quantizer keeps its scheme
    q.set_config(TARGETS["matlab"])
    qg = q.quantize().qgraph
    assert all(n.quantized for n in qg.nodes if n.op in ("conv", "linear")), [n for n in qg.nodes if n.reason]
    for n in qg.nodes:
        if n.quantized:
            assert math.log2(n.scale) == round(math.log2(n.scale)), n
    lsb = layerwise_lsb(qg, torch.from_numpy(to_float(cifar.test.images[:20])))
    assert max(lsb.values()) <= 1, lsb


@pytest.mark.compiler
def test_generated_c_is_bit_exact_on_the_degenerate_network(degenerate, cifar, tmp_path):
    """The floored scales (zero weights, tiny multipliers, a dead tensor at scale 1/255) are
    ordinary constants for code generation: the C library equals the reference executor."""
    from netquant.codegen import generate, load
    from netquant.ref.executor import run_int8

    _, q, _ = degenerate
    qn = q.quantize()
    x = to_float(cifar.test.images[:100])
    out = qn.qgraph.int_output()
    want = run_int8(qn.qgraph, torch.from_numpy(x), keep=[out])[out].numpy()
    net = load(generate(qn, tmp_path / "c", name="degenerate"))
    assert np.array_equal(net.predict_int(x), want), net.kernels


# --- a layer that truly cannot be quantized ---------------------------------------------------
class HugeFC(nn.Module):
    """A classifier over 72 x 32 x 32 = 73,728 post-ReLU values whose weights are all equal:
    255 * 127 * 73,728 > 2^31, so the weights alone can overflow the int32 accumulator."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 72, 1)
        self.fc = nn.Linear(72 * 32 * 32, 10)
        with torch.no_grad():
            self.fc.weight.fill_(1e-3)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def test_a_layer_that_cannot_be_quantized_stays_float_with_its_reason(cifar, caplog):
    torch.manual_seed(0)
    q = Quantizer(HugeFC().eval())
    with caplog.at_level("WARNING", logger="netquant.quant.lower"):
        table = q.calibrate(cifar.train.images[:20])  # no exception
    fc = q.quantize().qgraph.node("fc")
    assert not fc.quantized and fc.reason.startswith(CANNOT) and "2^31" in fc.reason
    assert "fc stays in floating point" in caplog.text
    row = table.set_index("Optimized Layer Name").loc["fc_Weights"]
    assert not row.Quantize and "2^31" in row.Reason
    details = q.quantization_details().set_index("Layer")
    assert not details.loc["fc", "Quantized"] and "2^31" in details.loc["fc", "Reason"]
    assert q.quantize().qgraph.node("conv_relu").quantized   # the rest is still integer
    x = to_float(cifar.test.images[:8])
    want = run_float(q.graph, torch.from_numpy(x), keep=())[q.graph.output].numpy()
    got = q.quantize().run(x)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def test_calibration_statistics_survive_a_failing_later_step(cifar, monkeypatch):
    """calibrate() stores the statistics before it lowers and builds the table; an error there
    (injected here) keeps them and says so."""
    import netquant.quantizer as quantizer_module

    q = Quantizer(HugeFC().eval())

    def broken(*args, **kwargs):
        raise RuntimeError("lowering failed")

    monkeypatch.setattr(quantizer_module, "lower", broken)
    with pytest.raises(RuntimeError, match="lowering failed") as err:
        q.calibrate(cifar.train.images[:4])
    assert q.ranges is not None and q.ranges.images == 4
    assert "statistics of 4 images were kept" in "".join(getattr(err.value, "__notes__", []))
    assert set(weight_stats(q.graph)) <= set(q.ranges.stats)
