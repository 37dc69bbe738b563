"""Generated C and CUDA run every layer the quantizer keeps in float, anywhere in the network
(docs/NUMERICS.md, "Float layers in generated code"): chains of elementwise float ops on an 8-bit
tensor as lookup tables (bit-exact with the reference executor), IEEE-exact float ops bit-exact,
float kernels (softmax, resampling, float convs...) within 1e-5 of the reference's float, on real
CIFAR-10 images."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from netquant.codegen import CodegenError, build, generate, load
from netquant.codegen.cuda_emulation import build_emulated
from netquant.codegen.program import plan, resample_taps
from netquant.data.transforms import to_float
from netquant.quant.qgraph import QGraph, QNode
from netquant.quantizer import Quantizer
from netquant.ref.executor import run_int8
from test_codegen_cuda import NVCC

pytestmark = pytest.mark.compiler

FLOAT_TOLERANCE = 1e-5   # float kernels vs the reference executor's float, of the tensor's largest magnitude


class UpFloat(nn.Module):
    """Hard-swish after a conv (a lookup table), a conv kept float in the middle with tanh and ELU
    on it (float kernels: their input is float), bilinear resampling with and without aligned
    corners, bicubic resampling, the product of two activations, a softmax at the end."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)   # kept float by the tests
        self.conv3 = nn.Conv2d(48, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        a = F.hardswish(self.conv1(x))                                     # 16x32x32
        b = F.relu(self.conv2(a))                                          # 16x16x16
        b = torch.tanh(self.mid(b))
        u = F.interpolate(b, size=(32, 32), mode="bilinear", align_corners=False)
        v = F.interpolate(F.elu(b), size=(32, 32), mode="bilinear", align_corners=True)
        z = F.interpolate(b, size=(32, 32), mode="bicubic", align_corners=False)
        x = torch.cat([u * v, z, a], 1)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return torch.softmax(self.fc(x.flatten(1)), 1)


class FloatEverywhere(nn.Module):
    """Layers the tests keep float: the first conv (it reads the NCHW input), an add, a max pool, a
    concat, an average pool and the last linear; a lone batch norm (float affine); softmax over H
    and log-softmax of the scores; hard-sigmoid and exp(-x) on 8-bit tensors (tables)."""

    FLOAT = ("conv1", "add", "max_pool2d_1", "cat", "avg_pool2d", "fc")

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv4 = nn.Conv2d(24, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        a = F.relu(self.conv1(x))
        b = self.bn(F.relu(self.conv2(a)) + a)
        c = F.hardsigmoid(self.conv3(b)) * torch.softmax(b, dim=2)
        d = torch.cat([F.max_pool2d(c, 2), F.max_pool2d(b, 2), torch.exp(-F.max_pool2d(a, 2))], 1)
        e = F.avg_pool2d(F.relu(self.conv4(d)), 2)
        return F.log_softmax(self.fc(e.flatten(1)), dim=1)


def _model(name: str) -> nn.Module:
    if name in zoo.EXTRAS:
        return zoo.make(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = {"up_float": UpFloat, "float_everywhere": FloatEverywhere}[name]()
    return model.eval()


FLOAT_LAYERS = {"up_float": ("mid",), "float_everywhere": FloatEverywhere.FLOAT}


@pytest.fixture(scope="module")
def quantized(cifar):
    """name -> QuantizedNetwork, calibrated on 20 real CIFAR-10 training images."""
    cache = {}

    def get(name):
        if name not in cache:
            q = Quantizer(_model(name))
            for layer in FLOAT_LAYERS.get(name, ()):
                q.set_quantize(layer, False)
            q.calibrate(cifar.train.images[:20])
            cache[name] = q.quantize()
        return cache[name]
    return get


@pytest.fixture(scope="module")
def images(cifar):
    return to_float(cifar.test.images[:20])


@pytest.fixture(scope="module")
def compiled(quantized, tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            gen = generate(quantized(name), tmp_path_factory.mktemp(name), name="net")
            cache[name] = (gen, load(gen))
        return cache[name]
    return get


def _reference_int(qnet, x):
    name = qnet.qgraph.int_output()
    return run_int8(qnet.qgraph, torch.from_numpy(x), keep=[name])[name].numpy()


def test_squeeze_excitation_and_hardswish_are_bit_exact(quantized, compiled, images):
    """zoo se_hardswish: hard-swish and sigmoid after convs run from 256-entry tables, the gating
    product is an IEEE-exact float mul: the integer output and the scores equal the reference."""
    qnet = quantized("se_hardswish")
    gen, net = compiled("se_hardswish")
    labels = [gen.kernels[s.node.name] for s in gen.program.float_steps()]
    assert sum("lookup table" in k and "hardswish" in k for k in labels) >= 2, labels
    assert any("lookup table" in k and "sigmoid" in k for k in labels), labels
    assert any(s.kind == "float" and s.node.attrs["fn"] == "mul" for s in gen.program.steps)
    assert np.array_equal(net.predict_int(images), _reference_int(qnet, images))
    assert np.array_equal(net.predict(images), qnet.run(images))
    assert gen.build["warnings"].strip() == "", gen.build["warnings"]


@pytest.mark.parametrize("name", ["upsample", "up_float", "float_everywhere"])
def test_float_kernels_keep_the_scores_and_predictions(name, quantized, compiled, images):
    """Float kernels (resampling, float convs, softmax...) differ from torch in the last bits, so a
    quantize after them may move an integer by one step where a value lies on a rounding boundary:
    the integer output agrees almost everywhere, top-1 everywhere, the scores within tolerance."""
    qnet = quantized(name)
    gen, net = compiled(name)
    got, ref = net.predict_int(images), _reference_int(qnet, images)
    assert (got != ref).mean() <= 0.01 and np.abs(got - ref).max() <= 2, (got != ref).sum()
    scores, want = net.predict(images), qnet.run(images)
    assert np.array_equal(scores.argmax(1), want.argmax(1))
    assert np.abs(scores - want).max() <= 1e-3 * np.abs(want).max()
    assert gen.build["warnings"].strip() == "", gen.build["warnings"]


def test_float_kernels_match_the_reference_float(quantized, images, tmp_path):
    """The network cut after the float product of two resampled tensors (a float conv kept in the
    middle, tanh, ELU, bilinear both ways, bicubic): every float value within 1e-5 of the
    reference's, and the output written in the caller's NCHW order."""
    qg = quantized("up_float").qgraph
    names = [n.name for n in qg.nodes]
    cut = QGraph(qg.nodes[:names.index("mul") + 1], "mul", qg.input)
    gen = generate(cut, tmp_path, name="cut")
    kinds = {(s.kind, s.node.attrs.get("fn")) for s in gen.program.float_steps()}
    assert {("conv", None), ("float", "tanh"), ("float", "elu"), ("float", "interpolate")} <= kinds
    got = load(gen).predict(images).reshape(len(images), 16, 32, 32)
    want = run_int8(cut, torch.from_numpy(images), keep=["mul"])["mul"].numpy()
    assert np.abs(got - want).max() <= FLOAT_TOLERANCE * np.abs(want).max()


def test_float_layers_anywhere(quantized, compiled, images):
    """Convs, adds, pools, concats and the last linear kept float; a float conv reading the NCHW
    input means there is no int8-input entry point, which says so."""
    gen, net = compiled("float_everywhere")
    p = gen.program
    float_ops = {s.kind for s in p.float_steps() if not s.node.quantized}
    assert {"conv", "add", "maxpool", "concat", "avgpool", "linear", "affine", "float"} <= float_ops
    assert p.int_input is None
    with pytest.raises(RuntimeError, match="no int8-input entry point"):
        net.predict_int8(np.zeros((1, 3, 32, 32), np.int8))
    per_channel = [s for s in p.steps if s.kind == "lut" and s.node.attrs["per_channel"]]
    assert [s.node.attrs["fns"] for s in per_channel] == [("affine", "exp")]   # exp(-x): the sign is an affine
    report = (gen.folder / "report.html").read_text()
    assert "Layers in float" in report and "kept in floating point by the user" in report


@pytest.mark.parametrize("mode, align_corners", [("bilinear", False), ("bilinear", True), ("bicubic", False),
                                                 ("bicubic", True)])
@pytest.mark.parametrize("n_in, n_out", [(8, 16), (16, 32), (7, 12), (12, 7)])
def test_resample_taps_reproduce_torch(mode, align_corners, n_in, n_out):
    """The tap tables of the resampling kernel, applied along both axes in the kernel's order,
    give torch's F.interpolate within float32 rounding."""
    x = torch.randn(1, 2, n_in, n_in, generator=torch.Generator().manual_seed(n_in))
    want = F.interpolate(x, size=(n_out, n_out), mode=mode, align_corners=align_corners)[0].numpy()
    idx, w = resample_taps(n_in, n_out, mode, align_corners)
    v = x[0].numpy().astype(np.float64)
    rows = (v[:, :, idx] * w).sum(-1)                          # (C, H, OW): along W first
    got = (rows[:, idx, :] * w[:, :, None]).sum(2)             # (C, OH, OW)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_lut_entry_worked_example():
    """docs/NUMERICS.md: int8 x 0.05 -> sigmoid -> int8 x 1/127: q = 20 (x = 1.0) maps to 93."""
    from netquant.codegen.program import lut_table

    src = QNode("a", "conv", ("x",), (4, 2, 2), True, 0.05, "int8")
    dq = QNode("a_dequantize", "dequantize", ("a",), (4, 2, 2), False, 0.05, "int8")
    sig = QNode("s", "float", ("a_dequantize",), (4, 2, 2), False, attrs={"fn": "sigmoid"})
    qz = QNode("s_quantize", "quantize", ("s",), (4, 2, 2), True, 1 / 127, "int8", {"clamp": (-128, 127)})
    table = lut_table(src, dq, [sig], qz)
    assert table.shape == (256,) and table.dtype == np.int8 and table[20 + 128] == 93
    x = torch.arange(-128, 128, dtype=torch.float32) * np.float32(0.05)
    assert np.array_equal(table, torch.floor(torch.sigmoid(x) * np.float32(127) + 0.5).clamp(-128, 127).numpy())


def test_unsupported_resampling_is_refused_naming_the_layer():
    nodes = (QNode("x", "input", (), (3, 8, 8), False),
             QNode("x_quantize", "quantize", ("x",), (3, 8, 8), True, 0.01, "int8", {"clamp": (-128, 127)}),
             QNode("x_dequantize", "dequantize", ("x_quantize",), (3, 8, 8), False, 0.01, "int8"),
             QNode("up", "float", ("x_dequantize",), (3, 16, 16), False,
                   attrs={"fn": "interpolate", "kwargs": {"size": (16, 16), "mode": "trilinear"}}))
    with pytest.raises(CodegenError, match="layer up: interpolate mode 'trilinear'"):
        plan(QGraph(nodes, "up", "x"))


@pytest.mark.slow
def test_cuda_float_layers_build_without_warnings(quantized, tmp_path):
    if NVCC is None:
        pytest.skip("nvcc not installed")
    # one library with the code of three GPU generations: nvcc compiles the device code for each
    gen = generate(quantized("up_float"), tmp_path, name="net", target="cuda", arch="sm_75,sm_80,sm_90")
    src = (tmp_path / "net.cu").read_text()
    assert "tanhf(" in src and "expm1f(" in src and "_table[" in src and "k_interpolate_hidx" in src
    build(gen)
    assert gen.build["warnings"].strip() == "", gen.build["warnings"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["up_float", "float_everywhere"])
def test_cuda_float_layers_equal_the_c_library_in_cpu_emulation(name, quantized, compiled, images, tmp_path):
    """Without a GPU: the CUDA kernels, one thread per output element run on the CPU, compute the
    C library's integers and scores (the same float bodies and tables)."""
    cuda = build_emulated(generate(quantized(name), tmp_path, name="net", target="cuda"))
    _, c = compiled(name)
    x = images[:6]
    assert np.array_equal(cuda.predict_int(x), c.predict_int(x))
    assert np.array_equal(cuda.predict(x), c.predict(x))


def test_cut_graph_keeps_its_float_output_layout(quantized):
    """A float output of shape (C, H, W) is the caller's NCHW array; every arena tensor is channels-last."""
    qg = quantized("up_float").qgraph
    names = [n.name for n in qg.nodes]
    p = plan(replace(qg, nodes=qg.nodes[:names.index("interpolate") + 1], output="interpolate"))
    assert p.buffer(p.output).layout == "nchw" and p.buffer(p.input).layout == "nchw"
    assert all(b.layout == "hwc" for b in p.buffers.values() if b.offset >= 0)
