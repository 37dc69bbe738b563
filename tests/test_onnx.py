"""ONNX export (netquant/export/onnx.py) on real CIFAR-10: the float graph and the int8 network in
QDQ form, run by ONNX Runtime and compared with netquant's own executors.

Tolerances (each test prints its numbers; see them with ``pytest -s``):

- float export vs ``run_float``: the same float32 ops in another library, only summation order
  and transcendental implementations differ. The issue asks for ~1e-4 on the probabilities of the
  shipped ResNet-20 (measured 4.2e-7 on 200 test images) and the same top-1 everywhere.
- int8 export run by ONNX Runtime vs the reference executor ``run_int8``: ONNX Runtime fuses the
  QDQ graph into its integer kernels (QLinearConv, QLinearAdd, QLinearAveragePool) that round
  half to even with a float requantization multiplier, where netquant rounds half up with an
  integer (M, shift), so a tensor can differ by an LSB and an image whose two best scores are
  that close can flip. The issue's requirement: the same top-1 on at least 99.5% of 1,000 test
  images (measured 100%; top-1 against the labels identical). With S3U3_conv2 kept in float:
  100% of 200. The small gather net (trained one epoch, so many near ties): 100% of 500 images,
  scores within 1 output LSB; the floors there (98%, median 2 LSB) leave room for near ties.
  Not tested here: power-of-two scales (target fpga/matlab) make exact ties common (an add of
  two inputs whose scales differ by 2x halves integers), where half-even and half-up differ;
  measured 98.6% top-1 agreement on 500 images for target "fpga".
- every net of tests/zoo.py (random weights, so many near ties), 100 test images: float export
  vs run_float within 1.8e-6 (floor 1e-4, the issue's); QDQ export vs run_int8 100% top-1
  agreement, scores within 2 LSB (floor 99%, the issue's); ONNX Runtime's own quantize_static
  on the float export (per-tensor, calibrated on 20 images) vs float top-1: 93-100% (floor 80%:
  it must run and be a quantization of this network; a wrong graph lands near 10%). On the
  shipped ResNet-20: 99.5% of 200 images (floor 95%).
- gathers: pure data movement, so ONNX Runtime and run_float agree exactly.
"""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netquant.data.transforms import to_float
from netquant.ir.float_exec import run_float
from netquant.ir.float_ops import FLOAT_FNS, FloatFn
from netquant.ir.graph import Graph, Node
from netquant.models.resnet import ImageInput
from netquant.quantizer import Quantizer

try:
    import onnx
    import onnxruntime as ort
except ImportError:  # pragma: no cover - the test extra installs both
    if os.environ.get("CI"):
        raise
    pytest.skip("onnx and onnxruntime are not installed (pip install -e '.[test]')", allow_module_level=True)

from onnxruntime.quantization import CalibrationDataReader, quantize_static  # noqa: E402

import zoo  # noqa: E402
from ort_qdq import qdq_session  # noqa: E402
from netquant import capture  # noqa: E402
from netquant.export import OnnxExportError, export_float_onnx, export_quantized_onnx  # noqa: E402
from netquant.export.onnx import EXPORTED_FLOAT_FNS, INPUT_NAME, gather_steps  # noqa: E402

FLOAT_PROB_TOL = 1e-4        # max |p_onnx - p_torch| on the shipped net's probabilities
INT8_AGREEMENT_FLOOR = 99.5  # %, top-1 of ONNX Runtime int8 vs the reference executor (the issue)
ZOO_INT8_AGREEMENT_FLOOR = 99.0   # %, the same on 100 images for each zoo net (random weights)
ORT_AGREEMENT_FLOOR = 80.0   # %, top-1 of ONNX Runtime's own quantize_static vs float, zoo nets


def attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def session(path) -> "ort.InferenceSession":
    return qdq_session(path)   # tests/ort_qdq.py: ONNX Runtime's saturating AVX2 kernels left out


def run_onnx(sess, x: np.ndarray, batch: int = 250) -> np.ndarray:
    return np.concatenate([sess.run(["scores"], {"images": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


@pytest.fixture(scope="module")
def quantizer(resnet20_quantizer):
    """The shipped ResNet-20, calibrated on 200 real training images (shared by the session:
    a test that changes it works on a copy)."""
    return resnet20_quantizer


# --- float ----------------------------------------------------------------------------------

def test_float_export_matches_run_float(quantizer, cifar, tmp_path):
    path = tmp_path / "resnet20.onnx"
    model = export_float_onnx(quantizer.graph, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert model.opset_import[0].version >= 17
    sess = session(path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, out.name) == ("images", "tensor(float)", "scores")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]   # a dynamic batch dimension
    assert sorted({n.op_type for n in model.graph.node}) == ["Add", "AveragePool", "Conv", "Gemm", "Mul", "Relu",
                                                             "Reshape", "Softmax"]

    x = to_float(cifar.test.images[:200])
    got = run_onnx(sess, x)
    want = run_float(quantizer.graph, torch.from_numpy(x), keep=())[quantizer.graph.output].numpy()
    diff = float(np.abs(got - want).max())
    print(f"\nfloat ONNX vs run_float, 200 test images: max |dp| = {diff:.3g}")
    assert got.shape == (200, 10)
    assert diff <= FLOAT_PROB_TOL
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)
    # any batch size, including one image
    np.testing.assert_allclose(sess.run(None, {"images": x[:1]})[0], got[:1], atol=1e-6)
    np.testing.assert_allclose(sess.run(None, {"images": x[:7]})[0], got[:7], atol=1e-6)


def channel_shuffle(x, groups):
    n, c, h, w = x.size()
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class GatherNet(nn.Module):
    """Every kind of gather (option-A shortcut: subsample and zero channel padding; chunk into
    halves; channel shuffle; flatten), concat, ReLU6, max and padded average pooling, and a float
    op (hard-swish) between integer layers."""

    def __init__(self):
        super().__init__()
        self.input = ImageInput()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.conv4 = nn.Conv2d(16, 16, 3, 1, 1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(self.input(x))))                          # 8x32x32
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))                  # option A: 16x16x16
        x = F.relu(self.bn2(self.conv2(x)) + shortcut)
        a, b = torch.chunk(x, 2, dim=1)
        x = channel_shuffle(torch.cat([a, F.relu6(self.bn3(self.conv3(b)))], 1), 2)
        x = F.max_pool2d(x, 2)                                                   # 16x8x8
        x = F.hardswish(self.conv4(x))
        x = F.avg_pool2d(x, 3, 2, 1)                                             # 16x4x4
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def gather_net(cifar):
    """GatherNet after one epoch on 5,000 real training images (a few seconds; the training
    helper of test_architectures)."""
    from test_architectures import build

    return build(GatherNet, cifar, images=5000, epochs=1)


def test_float_export_of_gathers_matches(gather_net, cifar, tmp_path):
    q = Quantizer(gather_net)
    gathers = [n for n in q.graph.nodes if n.op == "gather"]
    assert len(gathers) == 5 and any((n.params["index"] == 0).any() for n in gathers)  # the shortcut pads
    path = tmp_path / "gather.onnx"
    model = export_float_onnx(q.graph, path)
    ops = {n.op_type for n in model.graph.node}
    # shortcut: Slice with steps + Pad; chunk: Slice; shuffle: Reshape + Transpose + Reshape;
    # flatten: Reshape; ReLU6: Clip. Every one a strided view: no Gather
    assert {"Pad", "Slice", "Transpose", "Reshape", "Concat", "Clip", "MaxPool", "AveragePool", "HardSwish"} <= ops, ops
    assert "Gather" not in ops
    x = to_float(cifar.test.images[:200])
    got = run_onnx(session(path), x)
    with torch.no_grad():
        want = gather_net(torch.from_numpy(x)).numpy()
    captured = run_float(q.graph, torch.from_numpy(x), keep=())[q.graph.output].numpy()
    diff = float(np.abs(got - captured).max())
    print(f"\ngather net: float ONNX vs run_float on 200 test images: max |d logit| = {diff:.3g} "
          f"(logits up to {np.abs(captured).max():.3g}); vs the torch model {np.abs(got - want).max():.3g}")
    assert diff <= 1e-5 * max(1.0, float(np.abs(captured).max()))
    np.testing.assert_array_equal(got.argmax(1), captured.argmax(1))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_quantized_export_of_gathers_runs(gather_net, cifar, tmp_path):
    """The QDQ export of the gather net (Slice + Pad, Slice, Transpose, Concat with
    requantization, Clip for ReLU6, a float op between integer layers) agrees with the integer
    executor."""
    q = Quantizer(gather_net)
    q.calibrate(cifar.train.images[:200])
    qnet = q.quantize()
    assert not qnet.qgraph.node(next(n.name for n in q.graph.nodes if n.op == "float")).quantized
    path = tmp_path / "gather-int8.onnx"
    export_quantized_onnx(qnet, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    x = to_float(cifar.test.images[:500])
    got = run_onnx(session(path), x)
    want = qnet.run(x)
    lsb = qnet.qgraph.node(qnet.qgraph.output).scale
    diff_lsb = np.abs(got - want).max(1) / lsb
    same = 100.0 * float((got.argmax(1) == want.argmax(1)).mean())
    print(f"\ngather net: int8 ONNX Runtime vs run_int8, 500 test images: top-1 agreement {same:.1f}%, "
          f"scores within {diff_lsb.max():.1f} LSB (median {np.median(diff_lsb):.1f})")
    assert same >= 98.0
    assert np.median(diff_lsb) <= 2


# --- int8 -----------------------------------------------------------------------------------

def test_quantized_export_agrees_with_integer_executor(quantizer, cifar, tmp_path):
    qnet = quantizer.quantize()
    path = tmp_path / "resnet20-int8.onnx"
    export_quantized_onnx(qnet, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["images"] and sess.get_outputs()[0].name == "scores"
    x = to_float(cifar.test.images[:1000])
    labels = cifar.test.labels[:1000]
    got = run_onnx(sess, x)
    want = qnet.run(x)
    same = 100.0 * float((got.argmax(1) == want.argmax(1)).mean())
    top1 = (100.0 * float((got.argmax(1) == labels).mean()), 100.0 * float((want.argmax(1) == labels).mean()))
    print(f"\nint8 ONNX Runtime vs run_int8 on 1000 test images: top-1 agreement {same:.2f}%, top-1 "
          f"{top1[0]:.1f}% vs {top1[1]:.1f}%, max |dp| = {np.abs(got - want).max():.3g}")
    assert same >= INT8_AGREEMENT_FLOOR
    assert abs(top1[0] - top1[1]) <= 1.0


def test_quantized_export_is_qdq_of_the_integer_program(quantizer, tmp_path):
    """Weights int8 with per-channel DequantizeLinear (axis 0, scale weight_scale, zero point 0),
    bias int32 at s_x * s_w, activations Q/DQ with the node's scale and type, the input
    quantization a QuantizeLinear, the float layers float."""
    qg = quantizer.quantize().qgraph
    model = export_quantized_onnx(qg, tmp_path / "int8.onnx")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    by_output = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    nodes = {n.name: n for n in qg.nodes}
    weighted = [n for n in qg.nodes if n.quantized and n.op in ("conv", "linear")]
    assert len(weighted) == 22
    for n in weighted:
        w = inits[f"{n.name}.weight_int8"]
        assert w.dtype == np.int8 and np.array_equal(w, n.params["weight"])
        (dq,) = consumers[f"{n.name}.weight_int8"]
        assert dq.op_type == "DequantizeLinear" and attrs(dq) == {"axis": 0}
        np.testing.assert_array_equal(inits[dq.input[1]], n.params["weight_scale"].astype(np.float32))
        assert inits[dq.input[2]].dtype == np.int8 and not inits[dq.input[2]].any()
        b = inits[f"{n.name}.bias_int32"]
        assert b.dtype == np.int32 and np.array_equal(b, n.params["bias"])
        (bdq,) = consumers[f"{n.name}.bias_int32"]
        assert bdq.op_type == "DequantizeLinear" and attrs(bdq) == {"axis": 0}
        s_x = nodes[n.inputs[0]].scale
        np.testing.assert_allclose(inits[bdq.input[1]], s_x * n.params["weight_scale"], rtol=1e-7)
        assert inits[bdq.input[2]].dtype == np.int32
        layer = consumers[dq.output[0]][0]
        assert layer.op_type == ("Conv" if n.op == "conv" else "Gemm") and bdq.output[0] in layer.input
    for n in qg.nodes:
        if not n.quantized:
            continue
        qz = by_output[f"{n.name}_q"]
        assert qz.op_type == "QuantizeLinear"
        assert float(inits[qz.input[1]]) == float(np.float32(n.scale))
        assert inits[qz.input[2]].dtype == np.dtype(n.dtype) and inits[qz.input[2]] == 0
    first = by_output["input_quantize_q"]
    assert first.input[0] == "input"   # the input quantization reads the float normalisation
    assert by_output["input"].op_type == "Add" and by_output["scores"].op_type == "Softmax"


def test_float_layers_stay_float_in_the_qdq_export(quantizer, cifar, tmp_path):
    quantizer.save(tmp_path / "q.nq")
    q = Quantizer.load(tmp_path / "q.nq")   # a copy: the module's quantizer stays all-int8
    q.set_quantize("S3U3_conv2", False)
    qnet = q.quantize()
    assert not qnet.qgraph.node("S3U3_conv2").quantized
    model = export_quantized_onnx(qnet, tmp_path / "mixed.onnx")
    names = {i.name for i in model.graph.initializer}
    assert "S3U3_conv2.weight" in names and "S3U3_conv2.weight_int8" not in names
    outputs = {o for n in model.graph.node for o in n.output}
    assert {"S3U3_conv1_S3U3_relu1_dequantize", "S3U3_conv2_quantize_q"} <= outputs   # into and out of float
    x = to_float(cifar.test.images[:200])
    got, want = run_onnx(session(tmp_path / "mixed.onnx"), x), qnet.run(x)
    same = 100.0 * float((got.argmax(1) == want.argmax(1)).mean())
    print(f"\nS3U3_conv2 kept float: int8 ONNX Runtime vs run_int8 on 200 test images: top-1 agreement {same:.1f}%")
    assert same >= 99.0


# --- float ops, errors, files -----------------------------------------------------------------

@pytest.mark.parametrize("fn", sorted(FLOAT_FNS))
def test_every_float_op_exports(fn, cifar, tmp_path):
    """Each float op netquant knows, on real images spread over [-4, 4], against its torch
    definition (netquant/ir/float_ops.py)."""
    kwargs = {"softmax": {"dim": 1}, "log_softmax": {"dim": 1}, "leaky_relu": {"negative_slope": 0.2},
              "elu": {"alpha": 0.7}, "interpolate": {"size": (40, 24)}}.get(fn, {})
    ins = ("x", "x") if fn == "mul" else ("x",)
    shape = (3, 40, 24) if fn == "interpolate" else (3, 32, 32)
    g = Graph((Node("x", "input", (), (3, 32, 32)),
               Node("op", "float", ins, shape, {"fn": fn, "kwargs": kwargs}, layers=("op",))), "op")
    x = to_float(cifar.test.images[:20]) * 8 - 4
    export_float_onnx(g, tmp_path / "op.onnx")
    got = session(tmp_path / "op.onnx").run(None, {"images": x})[0]
    want = run_float(g, torch.from_numpy(x))["op"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unsupported_float_op_names_the_node(monkeypatch, tmp_path):
    monkeypatch.setitem(FLOAT_FNS, "erfinv", FloatFn(lambda x: torch.special.erfinv(x), "no int8 kernel"))
    g = Graph((Node("x", "input", (), (3, 32, 32)),
               Node("head_erfinv", "float", ("x",), (3, 32, 32), {"fn": "erfinv", "kwargs": {}}, layers=("head",))),
              "head_erfinv")
    run_float(g, torch.zeros(1, 3, 32, 32))   # a valid netquant graph
    path = tmp_path / "bad.onnx"
    with pytest.raises(OnnxExportError, match=r"head_erfinv.*'erfinv' has no ONNX export"):
        export_float_onnx(g, path)
    assert not path.exists() and list(tmp_path.iterdir()) == []   # nothing written on failure


def test_writes_only_the_file_asked_for(quantizer, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    out.mkdir()
    export_float_onnx(quantizer.graph, out / "f.onnx")
    export_quantized_onnx(quantizer.quantize(), str(out / "q.onnx"))
    assert sorted(p.name for p in out.iterdir()) == ["f.onnx", "q.onnx"]
    assert list(cwd.iterdir()) == []
    assert onnx.load(str(out / "q.onnx")).graph.output[0].name == "scores"
    with pytest.raises(FileNotFoundError):
        export_float_onnx(quantizer.graph, tmp_path / "missing" / "f.onnx")


def test_cli_export_onnx(quantizer, cifar, tmp_path, capsys):
    from netquant.cli import main

    saved = tmp_path / "q.nq"
    quantizer.save(saved)
    assert main(["export-onnx", "--quantizer", str(saved), "--out", str(tmp_path / "int8.onnx")]) == 0
    assert main(["export-onnx", "--float-network", "--out", str(tmp_path / "float.onnx")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'int8.onnx'}" in printed and f"wrote {tmp_path / 'float.onnx'}" in printed
    x = to_float(cifar.test.images[:100])
    want = quantizer.quantize().run(x)
    got = run_onnx(session(tmp_path / "int8.onnx"), x)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    f = run_onnx(session(tmp_path / "float.onnx"), x)
    ref = run_float(quantizer.graph, torch.from_numpy(x), keep=())[quantizer.graph.output].numpy()
    assert np.abs(f - ref).max() <= FLOAT_PROB_TOL
    assert main(["export-onnx", "--quantizer", str(saved), "--out", str(tmp_path / "x.onnx"),
                 "--float", "no_such_layer"]) == 2
    assert not (tmp_path / "x.onnx").exists()


def test_every_float_op_has_an_export():
    """Every float op netquant knows has an ONNX export (a new one needs its entry here too)."""
    assert set(FLOAT_FNS) <= set(EXPORTED_FLOAT_FNS), set(FLOAT_FNS) - set(EXPORTED_FLOAT_FNS)


@pytest.mark.parametrize("mode,corners", [("bilinear", False), ("bilinear", True), ("bicubic", False),
                                          ("bicubic", True), ("nearest", None), ("nearest-exact", None)])
def test_interpolate_exports_as_resize(mode, corners, cifar, tmp_path):
    """F.interpolate to a size that grows one axis by 45/32 and shrinks the other to 20/32, on
    real images, against torch: the same coordinates in every mode."""
    kwargs = {"size": (45, 20), "mode": mode, **({} if corners is None else {"align_corners": corners})}
    g = Graph((Node("x", "input", (), (3, 32, 32)),
               Node("up", "float", ("x",), (3, 45, 20), {"fn": "interpolate", "kwargs": kwargs}, layers=("up",))),
              "up")
    model = export_float_onnx(g, tmp_path / "resize.onnx")
    assert [n.op_type for n in model.graph.node][-1] == "Resize"
    x = to_float(cifar.test.images[:8])
    got = session(tmp_path / "resize.onnx").run(None, {"images": x})[0]
    # against torch itself: run_float holds the float op to bilinear (capture makes nearest a gather)
    want = F.interpolate(torch.from_numpy(x), **kwargs).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    if mode == "bilinear":
        np.testing.assert_allclose(run_float(g, torch.from_numpy(x))["up"].numpy(), want, rtol=0, atol=1e-6)
    bad = Graph((g.nodes[0], g.nodes[1].with_(attrs={"fn": "interpolate", "kwargs": {"size": (45, 20), "mode": "area"}})),
                "up")
    with pytest.raises(OnnxExportError, match=r"'up': interpolate .*'area'"):
        export_float_onnx(bad, tmp_path / "area.onnx")


# --- gathers ------------------------------------------------------------------------------------

def movement_index(fn, shape) -> tuple[np.ndarray, tuple]:
    """A data-movement function's index map, as capture records it: replayed on element numbers."""
    size = int(np.prod(shape))
    y = fn(torch.arange(1, size + 1, dtype=torch.float64).reshape(1, *shape))
    return y.reshape(-1).long().numpy(), tuple(y.shape[1:])


def random_index(shape):
    rng = np.random.default_rng(0)
    index = rng.permutation(int(np.prod(shape))) + 1
    index[rng.choice(len(index), 7, replace=False)] = 0
    return lambda x: torch.cat([x.new_zeros(1, 1), x.reshape(1, -1)], 1)[:, torch.from_numpy(index)]


# name: (function, input shape per image, the ONNX ops of its export)
GATHERS = {
    "flatten": (lambda x: x.flatten(1), (16, 4, 4), {"Reshape"}),
    "option_a_shortcut": (lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4)), (8, 16, 16), {"Slice", "Pad"}),
    "chunk": (lambda x: x.chunk(2, 1)[1], (16, 8, 8), {"Slice"}),
    "channel_shuffle": (lambda x: channel_shuffle(x, 4), (16, 8, 8), {"Reshape", "Transpose"}),
    "rgb_to_bgr": (lambda x: x.flip(1), (3, 32, 32), {"Slice"}),
    "crop_and_pad": (lambda x: F.pad(x[:, :, 2:30, 1:31], (2, 1, 2, 2)), (3, 32, 32), {"Slice", "Pad"}),
    "nearest_2x": (lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), (3, 16, 16), {"Reshape", "Expand"}),
    "expand_as": (lambda x: x[:, :, :1, :1].expand(-1, -1, 8, 8), (4, 8, 8), {"Slice", "Expand"}),
    "permute": (lambda x: x.permute(0, 2, 3, 1), (3, 8, 8), {"Transpose"}),
    "pixel_shuffle": (lambda x: F.pixel_shuffle(x, 2), (12, 8, 8), {"Reshape", "Transpose"}),
    "nearest_to_odd_size": (lambda x: F.interpolate(x, size=(11, 13), mode="nearest"), (3, 8, 8),
                            {"Flatten", "Gather", "Reshape"}),
    "random_with_zeros": (random_index((4, 5, 6)), (4, 5, 6), {"Flatten", "Pad", "Gather"}),
}


@pytest.mark.parametrize("kind", sorted(GATHERS))
def test_gathers_export_as_data_movement_ops(kind, cifar, tmp_path):
    """Each index map a network makes is written as the ops torch would export (strided views:
    no Gather); only maps that are no strided view become a Gather. ONNX Runtime gives exactly
    the values of run_float, for several batch sizes."""
    fn, shape, ops = GATHERS[kind]
    index, out_shape = movement_index(fn, shape)
    g = Graph((Node("x", "input", (), shape),
               Node("g", "gather", ("x",), out_shape, params={"index": index}, layers=("g",))), "g")
    model = export_float_onnx(g, tmp_path / "g.onnx")
    assert {n.op_type for n in model.graph.node} == ops
    assert_shapes_follow(model, g)
    size = int(np.prod(shape))
    x = to_float(cifar.test.images[:5]).reshape(5, -1)[:, :size].reshape(5, *shape)   # real pixels
    sess = session(tmp_path / "g.onnx")
    want = run_float(g, torch.from_numpy(x))["g"].numpy()
    np.testing.assert_array_equal(sess.run(None, {"images": x})[0], want)
    np.testing.assert_array_equal(sess.run(None, {"images": x[:1]})[0], want[:1])


def test_gather_steps_name_the_bad_index():
    with pytest.raises(OnnxExportError, match=r"expected 6 values in \[0, 4\]"):
        gather_steps(np.array([1, 2, 3, 4, 5, 0]), (4,), (6,))


# --- every network of the zoo, and ONNX Runtime's own quantizer --------------------------------

def assert_shapes_follow(model, graph) -> None:
    """Strict shape inference gives every node's tensor the shape (batch, *node.shape) with
    the batch symbolic (dynamic; N, or a fresh name after a Resize, whose shape inference in
    ONNX drops symbolic dims), and the output (N, *output shape)."""
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    checked = 0
    for n in graph.nodes:
        name = "scores" if n.name == graph.output else n.name
        if n.op != "input" and name in dims:
            assert isinstance(dims[name][0], str) and dims[name][1:] == list(n.shape), (n.name, dims[name], n.shape)
            checked += 1
    assert checked and dims["scores"] == ["N", *graph.node(graph.output).shape]


class Images(CalibrationDataReader):
    """ONNX Runtime's calibration protocol over real images, in batches of 10."""

    def __init__(self, x: np.ndarray):
        self.batches = iter([{"images": x[i:i + 10]} for i in range(0, len(x), 10)])

    def get_next(self):
        return next(self.batches, None)


def ort_quantize(float_path, out_path, calibration: np.ndarray):
    """``onnxruntime.quantization.quantize_static`` with its defaults (QDQ, per-tensor uint8
    activations and int8 weights), as a user of ONNX Runtime would run it."""
    quantize_static(str(float_path), str(out_path), Images(calibration))
    return session(out_path)


@pytest.mark.parametrize("name", zoo.ARCHITECTURES + zoo.EXTRAS)
def test_zoo_net_exports_run_in_onnx_runtime(name, cifar, tmp_path):
    """Each zoo net (random weights, measured batch-norm statistics), captured with
    netquant.capture and calibrated on 20 real training images: the float export runs in ONNX
    Runtime like run_float, ONNX Runtime's quantize_static quantizes it and the result runs,
    and the QDQ export agrees with the integer executor on 100 real test images."""
    q = Quantizer(graph=capture(zoo.make(name)), name=name)
    calibration = to_float(cifar.train.images[:20])
    x = to_float(cifar.test.images[:100])
    model = export_float_onnx(q.graph, tmp_path / "float.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert_shapes_follow(model, q.graph)
    sess = session(tmp_path / "float.onnx")
    got = run_onnx(sess, x)
    want = run_float(q.graph, torch.from_numpy(x), keep=())[q.graph.output].numpy()
    diff = float(np.abs(got - want).max())
    np.testing.assert_allclose(sess.run(None, {"images": x[:1]})[0], got[:1], atol=1e-6)   # any batch size

    ort_int8 = run_onnx(ort_quantize(tmp_path / "float.onnx", tmp_path / "ort-int8.onnx", calibration), x)
    ort_agree = 100.0 * float((ort_int8.argmax(1) == want.argmax(1)).mean())

    q.calibrate(calibration)
    qnet = q.quantize()
    export_quantized_onnx(qnet, tmp_path / "int8.onnx")
    onnx.checker.check_model(onnx.load(str(tmp_path / "int8.onnx")), full_check=True)
    got8 = run_onnx(session(tmp_path / "int8.onnx"), x)
    want8 = qnet.run(x)
    same = 100.0 * float((got8.argmax(1) == want8.argmax(1)).mean())
    lsb = float(np.abs(got8 - want8).max() / qnet.qgraph.node(qnet.qgraph.int_output()).scale)
    print(f"\n{name}: float ONNX vs run_float max |d| = {diff:.2g} (scores up to {np.abs(want).max():.2g}); "
          f"ORT quantize_static top-1 vs float {ort_agree:.0f}%; QDQ vs run_int8 top-1 {same:.0f}%, "
          f"max {lsb:.0f} LSB; ops {sorted({n.op_type for n in model.graph.node})}")
    assert diff <= FLOAT_PROB_TOL
    assert ort_int8.shape == (100, 10) and np.isfinite(ort_int8).all()
    assert ort_agree >= ORT_AGREEMENT_FLOOR
    assert same >= ZOO_INT8_AGREEMENT_FLOOR


def test_onnx_runtime_quantizes_the_float_export(quantizer, cifar, tmp_path):
    """ONNX Runtime's quantize_static on the shipped ResNet-20's float export. It used to fail:
    the input normalisation node "input" had its scale in an initializer "input_scale", the name
    ONNX Runtime's quantizer gives the scale it computes for tensor "input"."""
    model = export_float_onnx(quantizer.graph, tmp_path / "float.onnx")
    tensors = {INPUT_NAME} | {o for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    assert not {t + s for t in tensors for s in ("_scale", "_zero_point", "_quantized")} & inits
    readers = [i for n in model.graph.node if n.op_type in ("Conv", "Gemm") for i in n.input[1:]]
    assert len(readers) == len(set(readers)) == 2 * 22   # weights and biases: one reader each
    x = to_float(cifar.test.images[:200])
    got = run_onnx(ort_quantize(tmp_path / "float.onnx", tmp_path / "ort-int8.onnx",
                                to_float(cifar.train.images[:20])), x)
    want = run_float(quantizer.graph, torch.from_numpy(x), keep=())[quantizer.graph.output].numpy()
    same = 100.0 * float((got.argmax(1) == want.argmax(1)).mean())
    print(f"\nResNet-20: ONNX Runtime's quantize_static vs float top-1 on 200 test images: {same:.1f}%")
    assert same >= 95.0


def test_input_spec_exports(cifar, tmp_path):
    """A model that takes BGR pixels in [0, 255] with its own mean and std: the channel reorder
    netquant puts after the input is a Slice with step -1, the scaling one Mul and Add, in the
    float and the QDQ export alike."""
    from netquant.ir.input_spec import InputSpec

    spec = InputSpec(shape=(3, 32, 32), channel_order="BGR", value_range=(0.0, 255.0), mean=(125.0, 120.0, 110.0),
                     std=(60.0, 62.0, 66.0))
    q = Quantizer(zoo.make("resnet_b"), input_spec=spec)
    model = export_float_onnx(q.graph, tmp_path / "float.onnx")
    assert {"Slice", "Mul", "Add"} <= {n.op_type for n in model.graph.node}
    x = to_float(cifar.test.images[:100])
    got = run_onnx(session(tmp_path / "float.onnx"), x)
    want = run_float(q.graph, torch.from_numpy(x), keep=())[q.graph.output].numpy()
    assert np.abs(got - want).max() <= FLOAT_PROB_TOL
    q.calibrate(cifar.train.images[:20])
    qnet = q.quantize()
    export_quantized_onnx(qnet, tmp_path / "int8.onnx")
    got8, want8 = run_onnx(session(tmp_path / "int8.onnx"), x), qnet.run(x)
    assert 100.0 * float((got8.argmax(1) == want8.argmax(1)).mean()) >= ZOO_INT8_AGREEMENT_FLOOR
