"""The quantizer on the shipped ResNet-20 and real CIFAR-10: capture, calibration table, integer
executor (exact against int64, within 1 LSB of fake-quant), layer choices, save/load, bad input."""
import numpy as np
import pytest
import torch

from conftest import fresh_copy
from netquant.calib.stats import HALF_BINS, RangeStats
from netquant.calib.methods import threshold
from netquant.data import calibration_set, validation_set
from netquant.data.transforms import to_float
from netquant.ir.capture import CaptureError, capture
from netquant.ir.float_exec import run_float
from netquant.models.pretrained import load_pretrained
from netquant.quant import numerics as nx
from netquant.quant.config import QuantConfig, TARGETS
from netquant.quantizer import Quantizer
from netquant.ref.executor import run_int8
from netquant.ref.fakequant import layerwise_lsb, run_fakequant


@pytest.fixture(scope="module")
def net():
    return load_pretrained("cifarnet-20-16")


@pytest.fixture(scope="module")
def quantizer(resnet20_quantizer):
    """The session's ResNet-20 calibrated on 200 training images; tests that change its config
    or layer choices take a fresh_copy."""
    return resnet20_quantizer


def test_capture_names_and_fusion(net):
    g = capture(net)
    names = g.names()
    assert names[:3] == ["x", "input", "convInp_reluInp"]
    assert g.node("convInp_reluInp").layers == ("convInp", "bnInp", "reluInp")
    assert g.node("add11_relu11").layers == ("add11", "relu11")
    assert g.node("S2U1_convSkip").layers == ("S2U1_convSkip", "S2U1_bnSkip")
    assert [n.name for n in g.nodes if n.op == "affine"] == ["input"]  # every batch norm folded
    assert g.node("softmax").op == "float" and g.output == "softmax"


def test_float_graph_equals_torch_model(net, cifar):
    x = torch.from_numpy(to_float(cifar.test.images[:64]))
    g = capture(net)
    got = run_float(g, x)[g.output]
    with torch.no_grad():
        want = net(x)
    assert torch.allclose(got, want, atol=1e-5)


def test_calibration_table_rows_and_columns(quantizer):
    t = quantizer.calibration_table()
    assert list(t.columns[:5]) == ["Optimized Layer Name", "Network Layer Name", "Learnables / Activations",
                                   "MinValue", "MaxValue"]
    weighted = [n for n in quantizer.graph.nodes if n.op in ("conv", "linear")]
    assert (t["Learnables / Activations"] == "Weights").sum() == len(weighted) == 22
    assert (t["Learnables / Activations"] == "Bias").sum() == 22
    assert (t["Learnables / Activations"] == "Activations").sum() == len(quantizer.graph.nodes)
    row = t[t["Optimized Layer Name"] == "convInp_reluInp_Weights"].iloc[0]
    assert row["Network Layer Name"] == "convInp" and row.Type == "int8" and row.Quantize
    act = t[t["Optimized Layer Name"] == "convInp_reluInp"].iloc[0]
    assert act["Network Layer Name"] == "reluInp" and act.MinValue == 0 and act.Type == "uint8"
    assert (t.MinValue <= t.MaxValue).all()
    sm = t[t["Optimized Layer Name"] == "softmax"].iloc[0]
    assert not sm.Quantize and "softmax" in sm.Reason
    # min-max ranges: nothing saturates
    assert (t[t.Quantize]["Saturation %"] == 0).all()


def test_weights_and_bias_ranges_are_the_folded_values(quantizer):
    node = quantizer.graph.node("S1U1_conv1_S1U1_relu1")
    s = quantizer.ranges["S1U1_conv1_S1U1_relu1_Weights"]
    assert s.min == node.params["weight"].min() and s.max == node.params["weight"].max()
    assert np.array_equal(s.channel_max, node.params["weight"].reshape(16, -1).max(1))


def test_integer_network_types_and_bounds(quantizer):
    qg = quantizer.quantize().qgraph
    for n in qg.nodes:
        if n.op in ("conv", "linear"):
            assert n.params["weight"].dtype == np.int8 and np.abs(n.params["weight"]).max() <= 127
            assert n.params["bias"].dtype == np.int32
            assert n.attrs["acc_bound"] < 2 ** 31
            lo, hi = n.attrs["clamp"]
            if "relu" in n.name:
                assert lo == 0
    assert qg.node("input_quantize").dtype == "int8"
    assert qg.node("convInp_reluInp").dtype == "uint8"


def test_the_shipped_nets_pruned_channel_is_floored(quantizer):
    """convInp's channel 6 was pruned by training (batch-norm scale ~0): weights 4.3e-9, 1e-8 of
    the widest channel's. The weight scale floor (docs/NUMERICS.md, "Scale floors") gives it
    2^-16 of the widest channel's scale: weights 0, the bias exact to half a step, and a full
    31-bit multiplier (unfloored: weights of rounding noise, a bias of -12.7M and a multiplier cut
    to 28 bits at shift 62)."""
    f = quantizer.graph.node("convInp_reluInp").params
    n = quantizer.quantize().qgraph.node("convInp_reluInp")
    widest = np.abs(f["weight"]).reshape(16, -1).max(1)
    assert widest[6] < 1e-7 * widest.max()
    s_w = n.params["weight_scale"]
    assert s_w[6] == pytest.approx(s_w.max() * nx.WEIGHT_SCALE_FLOOR)
    assert not n.params["weight"][6].any()
    s_b = quantizer.quantize().qgraph.node(n.inputs[0]).scale * s_w[6]
    assert abs(n.params["bias"][6] * s_b - f["bias"][6]) <= 0.5 * s_b
    assert n.params["multiplier"][6] >= 2 ** 30
    others = np.arange(16) != 6
    assert np.allclose(s_w[others], widest[others] / 127)   # the other channels are untouched


def _int64_conv(x: np.ndarray, n) -> np.ndarray:
    """A direct int64 conv + requantization, independent of the executor's float32 path."""
    w = n.params["weight"].astype(np.int64)
    O, I, kh, kw = w.shape
    (sh, sw), (ph, pw) = n.attrs["stride"], n.attrs["padding"]
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    H, W = n.shape[1:]
    acc = np.zeros((len(x), O, H, W), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + sh * H:sh, j:j + sw * W:sw]  # (N, I, H, W)
            acc += np.einsum("nihw,oi->nohw", patch, w[:, :, i, j])
    acc += n.params["bias"].astype(np.int64)[:, None, None]
    M = n.params["multiplier"].astype(np.int64)[:, None, None]
    s = n.params["shift"].astype(np.int64)[:, None, None]
    return np.clip((acc * M + (1 << (s - 1))) >> s, *n.attrs["clamp"])


def test_executor_conv_equals_direct_int64(quantizer, cifar):
    qg = quantizer.quantize().qgraph
    x = torch.from_numpy(to_float(cifar.test.images[:20]))
    vals = run_int8(qg, x)
    for name in ("convInp_reluInp", "S1U1_conv2", "S2U1_conv1_S2U1_relu1", "S3U1_convSkip", "S3U3_conv2"):
        n = qg.node(name)
        want = _int64_conv(vals[n.inputs[0]].numpy(), n)
        assert np.array_equal(vals[name].numpy(), want), name


def test_executor_within_one_lsb_of_fake_quant(quantizer, cifar):
    """The quick tier's form of test_acceptance.py's check (1,000 images, slow): on 100 test
    images, every layer within 1 LSB of fake-quant and at most one top-1 flip, per scheme."""
    q = fresh_copy(quantizer)
    x = torch.from_numpy(to_float(cifar.test.images[:100]))
    for cfg in (QuantConfig(), TARGETS["matlab"]):
        q.set_config(cfg)
        qg = q.quantize().qgraph
        lsb = layerwise_lsb(qg, x)
        assert max(lsb.values()) <= 1, lsb
        fq = run_fakequant(qg, x).numpy()
        iq = run_int8(qg, x, keep=())[qg.output].numpy()
        assert (fq.argmax(1) != iq.argmax(1)).sum() <= 1


def test_keep_a_layer_float(quantizer, cifar):
    q = fresh_copy(quantizer)
    q.set_quantize("S1U1_conv1", False)  # a Network Layer Name picks its fused node
    qg = q.quantize().qgraph
    n = qg.node("S1U1_conv1_S1U1_relu1")
    assert not n.quantized and "user" in n.reason
    assert qg.node("convInp_reluInp_dequantize").op == "dequantize"
    assert qg.node("S1U1_conv1_S1U1_relu1_quantize").op == "quantize"
    row = q.calibration_table().set_index("Optimized Layer Name").loc["S1U1_conv1_S1U1_relu1_Weights"]
    assert not row.Quantize and "user" in row.Reason
    details = q.quantization_details().set_index("Layer")
    assert details.loc["S1U1_conv1_S1U1_relu1", "QuantizedBytes"] == details.loc["S1U1_conv1_S1U1_relu1", "FloatBytes"]
    result = q.validate(validation_set(cifar, 200))
    assert result.agreement >= 95
    q.set_quantize("S1U1_relu1", True)
    assert q.quantize().qgraph.node("S1U1_conv1_S1U1_relu1").quantized
    with pytest.raises(KeyError, match="no layer named 'S9U9_conv1'"):
        q.set_quantize("S9U9_conv1", False)


def test_validate_tables_and_custom_metrics(quantizer, cifar):
    def accuracy(scores, labels):  # MATLAB's hComputeAccuracy, in full
        return float((scores.argmax(1) == labels).mean())

    r = quantizer.validate(validation_set(cifar), metrics=["top1", "top5", accuracy, "netquant.metrics:top1"])
    assert r.num_samples == 50
    assert list(r.metrics) == ["top1", "top5", "accuracy"]  # the importable top1 is the same function
    t = r.metrics["accuracy"]
    assert list(t.columns) == ["NetworkImplementation", "MetricOutput", "LearnableParameterMemory(bytes)"]
    assert t.NetworkImplementation.tolist() == ["Floating-Point", "Quantized"]
    assert np.isclose(t.MetricOutput[0] * 100, r.metrics["top1"].MetricOutput[0])
    fmem, qmem = t["LearnableParameterMemory(bytes)"]
    assert fmem == 1_089_896 and 1 - qmem / fmem >= 0.74
    assert r.layer_errors.SQNR_dB.min() > 15
    with pytest.raises(ValueError, match="unknown metric 'top7'"):
        quantizer.validate(validation_set(cifar), metrics=["top7"])
    with pytest.raises(ValueError, match="needs labels"):
        quantizer.validate(cifar.test.images[:10])


def test_save_load_rebuilds_the_same_integers(quantizer, tmp_path, cifar):
    quantizer = fresh_copy(quantizer)
    quantizer.set_quantize("S3U3_conv2", False)
    path = tmp_path / "q.nq"
    quantizer.save(path)
    again = Quantizer.load(path)
    a, b = quantizer.quantize().qgraph, again.quantize().qgraph
    assert [n.name for n in a.nodes] == [n.name for n in b.nodes]
    for x, y in zip(a.nodes, b.nodes):
        assert x.quantized == y.quantized and x.scale == y.scale
        for k in x.params:
            assert np.array_equal(x.params[k], y.params[k]), (x.name, k)
    imgs = to_float(cifar.test.images[:32])
    assert np.array_equal(quantizer.quantize().run(imgs), again.quantize().run(imgs))
    assert again.provenance["calibration"]["images"] == 200
    assert not again.quantize().qgraph.node("S3U3_conv2").quantized   # the layer choice travelled


def test_corrupt_and_foreign_files(quantizer, tmp_path, net, cifar):
    bad = tmp_path / "bad.nq"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="bad.nq: not a netquant.quantizer file, or it is corrupt"):
        Quantizer.load(bad)
    good = tmp_path / "good.nq"
    quantizer.save(good)
    cut = tmp_path / "cut.nq"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ValueError, match="cut.nq"):
        Quantizer.load(cut)
    # a calibration of another network
    from netquant.models import resnet

    other = Quantizer(resnet(8, 3).eval())
    other.calibrate(calibration_set(cifar, 20))
    stats = tmp_path / "other.nqc"
    other.save_calibration(stats)
    with pytest.raises(ValueError, match="other.nqc: calibration statistics of another network"):
        quantizer.load_calibration(stats)


def test_wrong_version_is_refused(quantizer, tmp_path):
    import json
    import zipfile

    path = tmp_path / "q.nq"
    quantizer.save(path)
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(files["manifest.json"])
    manifest["format_version"] = 99
    files["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
    with pytest.raises(ValueError, match="version 99, this netquant reads version 1"):
        Quantizer.load(path)


def test_bad_input(net, cifar):
    q = Quantizer(net)
    with pytest.raises(ValueError, match="no images"):
        q.calibrate(cifar.train.images[:0])
    nan = to_float(cifar.train.images[:8])
    nan[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 image\\(s\\) hold NaN or inf"):
        q.calibrate(nan)
    with pytest.raises(ValueError, match=r"expected shape \(N, 3, 32, 32\), got \(8, 32, 32, 3\)"):
        q.calibrate(cifar.train.images[:8].transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="calibrate first"):
        q.quantize()

    class NoConv(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x).mean((2, 3))

    with pytest.raises(CaptureError, match="no conv or fully connected layer"):
        Quantizer(NoConv().eval())
    with pytest.raises(CaptureError, match="Sequential is in training mode; call model.eval"):
        capture(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


def test_histogram_doubling_is_exact():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=10000).astype(np.float32), (rng.normal(size=10000) * 9).astype(np.float32)
    two = RangeStats("Activations", "t", "t").update(a).update(b)
    one = RangeStats("Activations", "t", "t").update(np.concatenate([b, a]))
    assert two.limit == one.limit and np.array_equal(two.hist, one.hist)
    assert two.hist.sum() == 20000 and two.log2_hist.sum() + two.zeros == 20000


def test_range_methods():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200000).astype(np.float32)
    s = RangeStats("Activations", "t", "t").update(x)
    amax = float(np.abs(x).max())
    assert threshold(s, "minmax", 127) == amax
    p = threshold(s, "percentile", 127, 99.0)
    assert abs(p - np.percentile(np.abs(x), 99.0)) < 2 * s.limit / HALF_BINS
    for m in ("entropy", "mse"):
        t = threshold(s, m, 127)
        assert 2.0 < t < amax, (m, t)  # clips the rare tail of a Gaussian, keeps its body
    with pytest.raises(ValueError, match="unknown range method"):
        threshold(s, "magic", 127)
