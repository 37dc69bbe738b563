"""The input spec: a model that does not normalise its input itself declares what it expects
(channel order, pixel range, mean, std) once, and netquant puts the conversion into the graph.

The shipped ResNet-20 normalises inside (its ``input`` layer); with that layer replaced by an
identity it is a model that expects normalised input, and with its first conv's input channels
reversed and the statistics scaled to 0..255 it is one that expects BGR pixels in 0..255. With
the matching spec each gives the shipped network's top-1; without it, top-1 collapses."""
import copy
import json
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from netquant.data.transforms import to_float
from netquant.ir.float_exec import run_float
from netquant.ir.input_spec import AFFINE_NAME, REORDER_NAME, InputSpec, apply_input_spec
from netquant.metrics import agreement
from netquant.models.pretrained import load_pretrained
from netquant.models.resnet import CIFAR10_MEAN, CIFAR10_STD, ImageInput
from netquant.quantizer import Quantizer

CIFAR = (3, 32, 32)
N_TEST = 300          # test images for the top-1 comparisons
N_CALIB = 50          # training images for calibration


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained("cifarnet-20-16")


@pytest.fixture(scope="module")
def bare(shipped):
    """The shipped network without its normalisation layer: it expects (x - mean) / std."""
    model = copy.deepcopy(shipped)
    model.input = nn.Identity()
    return model.eval()


@pytest.fixture(scope="module")
def reference(shipped, cifar):
    """int8 scores of the shipped network (which normalises itself), as the baseline."""
    q = Quantizer(shipped)
    q.calibrate(cifar.train.images[:N_CALIB])
    x = to_float(cifar.test.images[:N_TEST])
    return q, q.quantize().run(x)


def _top1(scores, labels) -> float:
    return 100.0 * float((scores.argmax(1) == labels).mean())


# --- the spec itself ---------------------------------------------------------------------------
def test_arguments_are_validated_with_their_names():
    with pytest.raises(ValueError, match=r"input_spec.shape: expected \(C, H, W\)"):
        InputSpec((32, 32))
    with pytest.raises(ValueError, match=r"input_spec.shape: expected \(C, H, W\)"):
        InputSpec((3, 0, 32))
    with pytest.raises(ValueError, match="input_spec.std: every value must be > 0"):
        InputSpec(CIFAR, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match=r"input_spec.mean: expected 3 values \(one per input channel\), got 2"):
        InputSpec(CIFAR, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="input_spec.std: expected 1 values"):
        InputSpec((1, 28, 28), std=(0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="input_spec.channel_order: 'BGR' needs 3 input channels"):
        InputSpec((1, 28, 28), channel_order="BGR")
    with pytest.raises(ValueError, match="input_spec.channel_order: expected one of"):
        InputSpec(CIFAR, channel_order="bgr")
    with pytest.raises(ValueError, match="input_spec.value_range: expected \\(low, high\\) with low < high"):
        InputSpec(CIFAR, value_range=(255, 0))
    with pytest.raises(ValueError, match="input_spec.mean: expected finite numbers"):
        InputSpec(CIFAR, mean=(0.5, float("nan"), 0.5))
    with pytest.raises(ValueError, match="input_spec: unknown fields \\['scale'\\]"):
        InputSpec.from_json({"shape": [3, 32, 32], "scale": 2})


def test_json_round_trip_and_math():
    spec = InputSpec([3, 224, 224], "BGR", (0, 255), [103.53, 116.28, 123.675], [57.375, 57.12, 58.395])
    assert spec.shape == (3, 224, 224) and spec.value_range == (0.0, 255.0)
    assert InputSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert "BGR" in repr(spec) and "range=(0.0, 255.0)" in repr(spec)
    # the module docstring's worked example: red 0.5 on ImageNet's z-score over 0..255 pixels,
    # which a BGR model reads as its channel 2
    x = np.zeros((1, 3, 1, 1), np.float32)
    x[0, 0] = 0.5
    y = spec.apply(x)
    assert y[0, 2, 0, 0] == pytest.approx((255 * 0.5 - 123.675) / 58.395) == pytest.approx(0.0655, abs=1e-4)
    assert y[0, 0, 0, 0] == pytest.approx(-103.53 / 57.375)           # blue 0
    assert InputSpec(CIFAR).is_identity and not spec.is_identity


# --- on a network --------------------------------------------------------------------------------
def test_spec_restores_the_shipped_top1_without_renaming_layers(shipped, bare, reference, cifar):
    q_ref, ref_scores = reference
    x = to_float(cifar.test.images[:N_TEST])
    labels = cifar.test.labels[:N_TEST]
    spec = InputSpec(CIFAR, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    q = Quantizer(bare, input_spec=spec)
    q.calibrate(cifar.train.images[:N_CALIB])
    scores = q.quantize().run(x)
    plain = Quantizer(bare)                   # the model that needs a spec, without one
    plain.calibrate(cifar.train.images[:N_CALIB])
    wrong = plain.quantize().run(x)
    top1 = (_top1(ref_scores, labels), _top1(scores, labels), _top1(wrong, labels))
    print(f"\n{N_TEST} test images, int8 top-1: shipped {top1[0]:.1f}%, bare + spec {top1[1]:.1f}%, "
          f"bare without spec {top1[2]:.1f}%; agreement with the shipped int8 {agreement(ref_scores, scores):.1f}%")
    # the spec's affine is the shipped normalisation in another float32 rounding: the same int8
    # network up to a rare input step, so the same predictions
    assert agreement(ref_scores, scores) >= 99.0 and abs(top1[0] - top1[1]) <= 0.5
    assert top1[0] - top1[2] > 20        # forgetting the normalisation costs tens of points
    # layer names are the model's own: only the input node's name differs
    names, ref_names = q.graph.names(), q_ref.graph.names()
    assert names[1] == AFFINE_NAME and ref_names[1] == "input" and names[2:] == ref_names[2:]
    assert not any(n.startswith("1.") for n in names)
    row = q.calibration_table().set_index("Optimized Layer Name").loc[AFFINE_NAME]
    assert not row.Quantize and "normalisation" in row.Reason
    assert "input: InputSpec(shape=(3, 32, 32), RGB" in repr(q)


def test_bgr_pixels_in_0_255(shipped, bare, reference, cifar):
    """A model that expects BGR in 0..255: the first conv reads its input channels reversed, and
    mean and std are per BGR channel, scaled to 0..255."""
    _, ref_scores = reference
    model = copy.deepcopy(bare)
    with torch.no_grad():
        model.convInp.weight.copy_(model.convInp.weight.flip(1))
    spec = InputSpec(CIFAR, "BGR", (0, 255), tuple(255 * m for m in CIFAR10_MEAN[::-1]),
                     tuple(255 * s for s in CIFAR10_STD[::-1]))
    q = Quantizer(model, input_spec=spec)
    assert q.graph.names()[1:3] == [AFFINE_NAME, REORDER_NAME]
    x = to_float(cifar.test.images[:N_TEST])
    with torch.no_grad():
        want = shipped(torch.from_numpy(x[:100]))
    got = run_float(q.graph, torch.from_numpy(x[:100]), keep=())[q.graph.output]
    assert torch.allclose(got, want, atol=1e-5)
    q.calibrate(cifar.train.images[:N_CALIB])
    qg = q.quantize().qgraph
    assert not qg.node(AFFINE_NAME).quantized and qg.node(REORDER_NAME).quantized  # reorder in integers
    scores = q.quantize().run(x)
    assert agreement(ref_scores, scores) >= 99.0


def test_own_normalisation_merges_with_the_spec(shipped, bare, cifar):
    """A model that normalises 0..255 pixels itself: the spec only scales [0, 1] to 0..255, and
    merges into the model's own normalisation, which keeps its name."""
    model = copy.deepcopy(bare)
    model.input = ImageInput(tuple(255 * m for m in CIFAR10_MEAN), tuple(255 * s for s in CIFAR10_STD))
    q = Quantizer(model.eval(), input_spec=InputSpec(CIFAR, value_range=(0, 255)))
    assert q.graph.names() == Quantizer(shipped).graph.names()            # one affine, named "input"
    assert [n.name for n in q.graph.nodes if n.op == "affine"] == ["input"]
    x = torch.from_numpy(to_float(cifar.test.images[:50]))
    with torch.no_grad():
        assert torch.allclose(run_float(q.graph, x, keep=())[q.graph.output], shipped(x), atol=1e-5)


def test_spec_must_fit_the_network(bare):
    with pytest.raises(ValueError, match=r"input_spec.shape \(3, 64, 64\) does not match the network input "
                                         r"\(3, 32, 32\)"):
        Quantizer(bare, input_spec=InputSpec((3, 64, 64)), example=torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="input_spec: expected an InputSpec"):
        Quantizer(bare, input_spec=(3, 32, 32))
    g = Quantizer(bare).graph
    assert apply_input_spec(g, None) is g and apply_input_spec(g, InputSpec(CIFAR)) is g


def test_save_load_keeps_the_spec(bare, cifar, tmp_path):
    spec = InputSpec(CIFAR, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    q = Quantizer(bare, input_spec=spec)
    q.calibrate(cifar.train.images[:20])
    path = tmp_path / "spec.nq"
    q.save(path)
    again = Quantizer.load(path)
    assert again.input_spec == spec
    assert again.graph.names() == q.graph.names()           # applied once, not twice
    x = to_float(cifar.test.images[:16])
    assert np.array_equal(again.quantize().run(x), q.quantize().run(x))
    # a file written before input specs existed loads with none
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(files["manifest.json"])
    del manifest["input_spec"]
    files["manifest.json"] = json.dumps(manifest).encode()
    old = tmp_path / "old.nq"
    with zipfile.ZipFile(old, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
    assert Quantizer.load(old).input_spec is None


@pytest.mark.compiler
def test_generated_c_runs_the_spec_bit_exact(cifar, tmp_path):
    """Code generation takes the spec's float affine on the input and its integer channel
    reorder: the C library equals the integer reference executor bit for bit."""
    from netquant.codegen import generate, load
    from netquant.ref.executor import run_int8

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    q = Quantizer(model, input_spec=InputSpec(CIFAR, "BGR", (0, 255), (125.0, 123.0, 114.0), (63.0, 62.0, 66.0)))
    q.calibrate(cifar.train.images[:50])
    qn = q.quantize()
    x = to_float(cifar.test.images[:64])
    out = qn.qgraph.int_output()
    want = run_int8(qn.qgraph, torch.from_numpy(x), keep=[out])[out].numpy()
    net = load(generate(qn, tmp_path / "c", name="spec"))
    assert np.array_equal(net.predict_int(x), want)


def test_onnx_exports_carry_the_spec(cifar, tmp_path):
    """The float and the int8 QDQ ONNX exports take netquant's images too: the spec's nodes are
    in the graph they are exported from."""
    pytest.importorskip("onnxruntime")
    from ort_qdq import qdq_session
    from netquant.export import export_float_onnx, export_quantized_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    q = Quantizer(model, input_spec=InputSpec(CIFAR, "BGR", (0, 255), (125.0, 123.0, 114.0), (63.0, 62.0, 66.0)))
    q.calibrate(cifar.train.images[:50])
    x = to_float(cifar.test.images[:64])

    def run(path):
        return qdq_session(path).run(["scores"], {"images": x})[0]   # tests/ort_qdq.py

    export_float_onnx(q.graph, tmp_path / "f.onnx")
    want = run_float(q.graph, torch.from_numpy(x), keep=())[q.graph.output].numpy()
    assert np.abs(run(tmp_path / "f.onnx") - want).max() < 1e-5
    with torch.no_grad():   # and it is the model fed what it expects
        assert np.abs(model(q.input_spec.apply(torch.from_numpy(x))).numpy() - want).max() < 1e-5
    export_quantized_onnx(q.quantize(), tmp_path / "q.onnx")
    got, want = run(tmp_path / "q.onnx"), q.quantize().run(x)
    # ONNX Runtime rounds half to even where netquant rounds half up (tests/test_onnx.py): the
    # same top-1 on this small net, scores within one output step
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.98
    qg = q.quantize().qgraph
    assert np.abs(got - want).max() <= 1.01 * qg.node(qg.int_output()).scale
