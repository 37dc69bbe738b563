"""Networks nobody here wrote, end to end: each of the seven published-style architectures of
tests/zoo.py is exported with ``torch.onnx.export``, imported, checked against torch in float,
quantized, generated as C that must equal the integer reference executor bit for bit, and
exported as int8 QDQ ONNX that ONNX Runtime must load and run. The same network captured
straight from torch (its size-reading forward as published) must give the same float graph.

Tolerances, named by what they compare: float import/capture against torch 1e-4 of the largest
score; generated C against the reference executor: exact integers; ONNX Runtime's QDQ run
against the integer executor: the same class on at least 90% of images (ORT rounds half to
even, netquant half up, so ties may move a score by one step; random-weight nets have close
scores) and the scores within a few output steps.
"""
import numpy as np
import pytest
import torch

from netquant.codegen import generate, load
from netquant.data.transforms import to_float
from netquant.export.onnx import export_quantized_onnx
from netquant.ir.capture import capture
from netquant.ir.float_exec import run_float
from netquant.ir.onnx_import import import_onnx
from netquant.quantizer import Quantizer
from netquant.ref.executor import run_int8

from ort_qdq import qdq_session
from zoo import ARCHITECTURES, make

pytestmark = [pytest.mark.compiler, pytest.mark.slow]
FLOAT_TOL = 1e-4        # float graph against torch, relative to the largest |score|
CALIBRATION_IMAGES = 32
CHECK_IMAGES = 64


def _float_out(graph, x: np.ndarray) -> np.ndarray:
    return run_float(graph, torch.from_numpy(x), keep=())[graph.output].numpy()


@pytest.fixture(scope="module")
def images(cifar):
    return (to_float(cifar.train.images[:CALIBRATION_IMAGES]), to_float(cifar.test.images[:CHECK_IMAGES]))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_onnx_file_to_bit_exact_c_and_qdq(arch, images, tmp_path):
    calib, x = images
    model = make(arch)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    path = tmp_path / f"{arch}.onnx"
    torch.onnx.export(model, (torch.from_numpy(x[:1]),), str(path), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["scores"], dynamic_axes={"image": {0: "n"}})

    # import: the float graph computes what torch computes
    graph = import_onnx(path)
    tol = FLOAT_TOL * float(np.abs(want).max())
    assert np.abs(_float_out(graph, x) - want).max() <= tol, f"{arch}: imported graph differs from torch"
    # captured straight from torch (the published forward, size reads and all): the same function
    captured = capture(model, torch.from_numpy(x[:2]))
    assert np.abs(_float_out(captured, x) - want).max() <= tol, f"{arch}: captured graph differs from torch"

    # quantize with no manual step
    q = Quantizer(graph=graph, name=arch)
    table = q.calibrate(calib)
    assert len(table) > 0
    qnet = q.quantize()
    int_name = qnet.qgraph.int_output()
    ref_int = run_int8(qnet.qgraph, torch.from_numpy(x), keep=[int_name])[int_name].numpy()
    ref_scores = qnet.run(x)

    # generated C: the same integers
    net = load(generate(qnet, tmp_path / "c", name=arch))
    assert np.array_equal(net.predict_int(x), ref_int), f"{arch}: generated C differs from the reference executor"
    assert np.array_equal(net.predict(x).argmax(1), ref_scores.argmax(1))

    # int8 QDQ ONNX runs in ONNX Runtime and agrees with the integer executor
    qdq = tmp_path / f"{arch}_int8.onnx"
    export_quantized_onnx(qnet, qdq)
    sess = qdq_session(qdq)   # tests/ort_qdq.py
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert got.shape == ref_scores.shape
    agree = float((got.argmax(1) == ref_scores.argmax(1)).mean())
    assert agree >= 0.9, f"{arch}: ONNX Runtime QDQ agrees with the integer executor on {agree:.0%} of images"
