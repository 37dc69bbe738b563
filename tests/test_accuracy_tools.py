"""Sensitivity analysis, cross-layer equalisation, bias correction and AdaRound
(netquant/accuracy/), on small zoo networks and real CIFAR-10 images."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
from netquant.accuracy.bias_correction import mean_output_errors
from netquant.accuracy.equalize import equalizable_pairs, equalize
from netquant.data.transforms import to_float
from netquant.ir.float_exec import apply_act, run_float
from netquant.quant.config import QuantConfig
from netquant.quant.lower import lower
from netquant.quantizer import Quantizer
from netquant.ref.executor import run_int8
from netquant.ref.fakequant import layerwise_lsb, preactivation

POW2 = dict(weight_granularity="per_tensor", scale="pow2")


class DepthwiseNet(nn.Module):
    """conv -> ReLU -> depthwise conv -> ReLU -> pointwise conv: two equalisable pairs, one depthwise."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.pw, self.bn3 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.dw(x)))
        x = F.relu(self.bn3(self.pw(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _depthwise_net():
    torch.manual_seed(0)
    m = DepthwiseNet()
    zoo._batchnorm_statistics(m, torch.Generator().manual_seed(1))
    with torch.no_grad():   # folded into conv1: output channels whose ranges span 100x, what CLE evens out
        m.bn1.weight.copy_(torch.logspace(-1, 1, 8))
    return m.eval()


def _images(cifar, n, start=0, split="train"):
    return to_float(getattr(cifar, split).images[start:start + n])


@pytest.mark.parametrize("net", ["depthwise", "resnet_a", "vgg"])
def test_cle_keeps_float_outputs_and_evens_weight_ranges(net, cifar):
    model = _depthwise_net() if net == "depthwise" else zoo.make(net)
    g = Quantizer(model, example=torch.rand(2, 3, 32, 32)).graph
    pairs = equalizable_pairs(g)
    assert pairs
    if net == "depthwise":
        assert [g.node(b).attrs["groups"] for _, b in pairs] == [8, 1]   # the depthwise case, then pointwise
    e = equalize(g)
    x = torch.from_numpy(_images(cifar, 16))
    a, b = run_float(g, x, keep=())[g.output], run_float(e, x, keep=())[e.output]
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
    for first, second in pairs:
        w1, w2 = e.node(first).params["weight"], e.node(second).params["weight"]
        r1 = np.abs(w1.reshape(len(w1), -1)).max(1)
        groups = e.node(second).attrs.get("groups", 1)
        r2 = np.abs(w2.reshape(groups, len(w2) // groups, w2.shape[1], -1)).max(axis=(1, 3)).reshape(-1)
        np.testing.assert_allclose(r1, r2, rtol=2e-2)
    if net == "depthwise":   # the per-tensor weight range of conv1 no longer spans 100x between channels
        w = e.node(pairs[0][0]).params["weight"]
        r = np.abs(w.reshape(len(w), -1)).max(1)
        w0 = g.node(pairs[0][0]).params["weight"]
        r0 = np.abs(w0.reshape(len(w0), -1)).max(1)
        assert r.max() / r.min() < 0.2 * r0.max() / r0.min()


@pytest.fixture(scope="module")
def calib(cifar):
    return _images(cifar, 64)


def test_bias_correction_reduces_the_mean_output_error(cifar, calib):
    model = zoo.make("resnet_a")
    plain = Quantizer(model, config=QuantConfig(**POW2), example=torch.rand(2, 3, 32, 32))
    plain.calibrate(calib)
    bc = Quantizer(model, config=QuantConfig(**POW2, bias_correction=True), example=torch.rand(2, 3, 32, 32))
    bc.calibrate(calib)
    held_out = _images(cifar, 64, split="test")
    for images, factor in ((calib, 0.2), (held_out, 0.8)):
        before = mean_output_errors(plain.graph, plain.ranges, plain.config, images)
        after = mean_output_errors(bc.graph, bc.ranges, bc.config, images)
        assert before.keys() == after.keys() and len(before) == 10
        total_before = sum(float(np.abs(v).mean()) for v in before.values())
        total_after = sum(float(np.abs(v).mean()) for v in after.values())
        assert total_after < factor * total_before, (total_before, total_after)
        if images is calib:   # every layer's mean error is gone up to the bias rounding
            for k in after:
                assert np.abs(after[k]).max() <= max(0.05 * np.abs(before[k]).max(), 1e-4), k


def _layer_mse(q_graph_src, qg, graph, x, layer):
    """MSE of act(preactivation) of ``layer`` in ``qg`` against the float layer, fed the integer
    input that ``q_graph_src`` (a QGraph) gives it."""
    n = qg.node(layer)
    src = q_graph_src.node(n.inputs[0])
    xq = run_int8(q_graph_src, x, keep=[src.name])[src.name]
    fnode = graph.node(layer)
    ref = run_float(graph, x, keep=[layer])[layer].to(torch.float64)
    y = apply_act(preactivation(n, xq, src.scale), fnode.attrs.get("act"))
    return float(((y - ref) ** 2).mean())


def test_adaround_beats_rounding_to_nearest_on_held_out_images(cifar, calib):
    model = zoo.make("vgg")
    cfg = QuantConfig(weight_bits=4, adaround=True, adaround_iterations=60)
    q = Quantizer(model, config=cfg, example=torch.rand(2, 3, 32, 32))
    q.calibrate(calib)
    ada = q.quantize().qgraph
    near = lower(q.graph, q.ranges, QuantConfig(weight_bits=4), q.user_float)
    learned = [n for n in q.graph.nodes if "adaround_weight" in n.params]
    assert len(learned) >= 3
    x = torch.from_numpy(_images(cifar, 100, split="test"))
    errors = []
    for fn in learned:
        a, b = ada.node(fn.name), near.node(fn.name)
        wa, wb = a.params["weight"], b.params["weight"]
        assert wa.dtype == np.int8 and np.abs(wa).max() <= 7 and np.abs(wa.astype(int) - wb).max() <= 1
        assert np.array_equal(a.params["weight_scale"], b.params["weight_scale"])
        assert (wa != wb).any()
        # each network's layer on its own integer input, against the float layer on the float input
        errors.append((_layer_mse(ada, ada, q.graph, x, fn.name), _layer_mse(near, near, q.graph, x, fn.name)))
    e = np.array(errors)
    assert e[0, 0] < e[0, 1]                         # the first layer (the same input in both)
    assert e[:, 0].sum() < 0.9 * e[:, 1].sum(), e     # and all together
    assert (e[:, 0] < e[:, 1]).sum() > len(e) / 2, e


@pytest.fixture(scope="module")
def all_flags(calib):
    cfg = QuantConfig(**POW2, cle=True, bias_correction=True, adaround=True, adaround_iterations=20)
    q = Quantizer(zoo.make("resnet_a"), config=cfg, example=torch.rand(2, 3, 32, 32))
    q.calibrate(calib[:32])
    return q


@pytest.mark.compiler
def test_generated_c_is_bit_exact_with_cle_bias_correction_and_adaround(all_flags, cifar, tmp_path):
    from netquant.codegen import generate, load

    qn = all_flags.quantize()
    assert any("adaround_weight" in n.params for n in all_flags.graph.nodes)
    assert any("bias_correction" in n.params for n in all_flags.graph.nodes)
    x = _images(cifar, 20, split="test")
    name = qn.qgraph.int_output()
    ref = run_int8(qn.qgraph, torch.from_numpy(x), keep=[name])[name].numpy()
    net = load(generate(qn, tmp_path / "c", name="flags"))
    assert np.array_equal(net.predict_int(x), ref)
    assert max(layerwise_lsb(qn.qgraph, torch.from_numpy(x[:8])).values()) <= 1   # fake-quant within 1 LSB


def test_save_load_keeps_the_flags_and_the_integers(all_flags, tmp_path):
    path = tmp_path / "flags.nq"
    all_flags.save(path)
    back = Quantizer.load(path)
    assert back.config == all_flags.config and back.config.adaround and back.config.cle
    a, b = all_flags.quantize().qgraph, back.quantize().qgraph
    for n in a.nodes:
        for k, v in n.params.items():
            assert np.array_equal(v, b.node(n.name).params[k]), (n.name, k)
    # a config written before these fields loads with them off
    old = {k: v for k, v in QuantConfig().to_dict().items()
           if k not in ("weight_bits", "cle", "bias_correction", "adaround", "adaround_iterations")}
    cfg = QuantConfig.from_dict(old)
    assert (cfg.weight_bits, cfg.cle, cfg.bias_correction, cfg.adaround) == (8, False, False, False)


def test_config_asking_for_an_unapplied_technique_is_refused(calib):
    q = Quantizer(zoo.make("lenet"), example=torch.rand(2, 3, 32, 32))
    q.calibrate(calib[:16])
    q.set_config(QuantConfig(cle=True))
    with pytest.raises(ValueError, match="calibrate again"):
        q.quantize()
    with pytest.raises(ValueError, match="weight_bits"):
        QuantConfig(weight_bits=9)


def test_sensitivity_table(cifar, calib):
    q = Quantizer(zoo.make("resnet_a"), config=QuantConfig(**POW2), example=torch.rand(2, 3, 32, 32))
    q.calibrate(calib[:32])
    x, y = cifar.test.images[:40], cifar.test.labels[:40]
    t = q.sensitivity((x, y), metric="top1", batch_size=20)
    qg = q.quantize().qgraph
    layers = [n.name for n in qg.nodes if n.quantized and n.op in ("conv", "linear", "add", "concat", "avgpool")]
    assert sorted(t.Layer) == sorted(layers) and len(t) >= 10
    assert list(t.columns[:3]) == ["Layer", "Network Layers", "Op"]
    drops = t.DropQuantizedOnly.to_numpy()
    assert (np.diff(drops) <= 1e-12).all()   # most harmful first
    xf = to_float(x)
    top1 = lambda s: 100.0 * float((s.argmax(1) == y).mean())   # noqa: E731
    fs = run_float(q.graph, torch.from_numpy(xf), keep=())[q.graph.output].numpy()
    assert t.attrs["float"] == top1(fs) and t.attrs["int8"] == top1(q.quantize().run(xf))
    # the reuse of the base runs gives what a full run of each variant gives
    every = frozenset(n.name for n in q.graph.nodes if n.op != "input")
    for row in (t.iloc[0], t.iloc[-1]):
        only_q = lower(q.graph, q.ranges, q.config, every - {row.Layer})
        only_f = lower(q.graph, q.ranges, q.config, frozenset({row.Layer}))
        assert row.QuantizedOnly == top1(run_int8(only_q, torch.from_numpy(xf), keep=())[only_q.output].numpy())
        assert row.FloatOnly == top1(run_int8(only_f, torch.from_numpy(xf), keep=())[only_f.output].numpy())
    assert np.isfinite(t.SQNR_dB).all() and (t.SQNR_dB > 5).all()
