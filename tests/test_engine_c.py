"""Validation with the int8 side on the compiled C library (``validate(engine="c")``, ``netquant
validate --engine c``): the same scores, bit for bit, as the integer reference executor, hence
the same tables, on real CIFAR-10."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from netquant.codegen import BuildError
from conftest import fresh_copy
from netquant.data import calibration_set, validation_set
from netquant.quantizer import Quantizer, _compiled_scores
from netquant.ref.executor import run_int8

pytestmark = pytest.mark.compiler


@pytest.fixture
def quantizer(resnet20_quantizer):
    """The session's calibrated ResNet-20, as a copy: compiled() keeps its library on it."""
    return fresh_copy(resnet20_quantizer)


class _Recorder:
    """A metric that keeps the scores it is given (the int8 ones last), and scores top-1."""

    __name__ = "recorded"

    def __init__(self):
        self.scores = []

    def __call__(self, scores, labels):
        self.scores.append(scores.copy())
        return float((scores.argmax(1) == labels).mean())


@pytest.mark.slow
def test_c_engine_gives_the_reference_tables_on_200_images(quantizer, cifar, tmp_path):
    val = validation_set(cifar, 200)
    py_rec, c_rec = _Recorder(), _Recorder()
    py = quantizer.validate(val, metrics=["top1", "top5", py_rec], error_images=20)
    c = quantizer.validate(val, metrics=["top1", "top5", c_rec], error_images=20, engine="c", c_folder=tmp_path)
    assert (py.engine, c.engine) == ("python", "c")
    # the int8 scores themselves are the reference executor's, bit for bit (not just close)
    py_int8, c_int8 = py_rec.scores[-1], c_rec.scores[-1]
    assert py_int8.shape == (200, 10) and py_int8.dtype == np.float32
    assert np.array_equal(py_int8, c_int8)
    for name in ("top1", "top5", "recorded"):
        assert py.metrics[name].equals(c.metrics[name]), name
    assert (py.num_samples, py.agreement, py.top1_difference, py.mcnemar_p) == \
        (c.num_samples, c.agreement, c.top1_difference, c.mcnemar_p)
    assert py.layer_errors.equals(c.layer_errors)
    assert str(py).splitlines()[1:] == str(c).splitlines()[1:]
    assert "compiled C library" in str(c).splitlines()[0]
    # the library was built where the caller asked, once: the next call reuses it
    assert (tmp_path / "net.c").exists()
    assert quantizer.compiled(tmp_path) is quantizer.compiled(tmp_path)


def test_unknown_engine_and_missing_compiler(quantizer, cifar, monkeypatch, tmp_path):
    val = validation_set(cifar, 10)
    with pytest.raises(ValueError, match="engine must be 'python'.*or 'c'.*got 'gpu'"):
        quantizer.validate(val, engine="gpu")
    monkeypatch.setenv("CC", "no-such-cc-netquant")
    with pytest.raises(BuildError, match="no C compiler found.*no-such-cc-netquant"):
        quantizer.validate(val, engine="c", c_folder=tmp_path / "never")
    assert not (tmp_path / "never").exists()   # refused before generating anything


class _FloatPoolNet(nn.Module):
    """Two convs, then a global average pool (a mean): with the pool kept float, the integer
    output is the last conv's (C, H, W) tensor (channels-last inside the library, NCHW out of
    ``predict_int``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 10, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x))).mean((2, 3))


def test_c_scores_through_a_float_tail_are_the_reference(cifar):
    q = Quantizer(_FloatPoolNet().eval(), example=torch.rand(2, 3, 32, 32))
    q.calibrate(calibration_set(cifar, 20))
    q.set_quantize("mean", False)
    qg = q.quantize().qgraph
    assert qg.node(qg.int_output()).shape == (10, 16, 16)   # a 3-D integer output
    x = cifar.test.images[:16].astype(np.float32) / 255
    got = _compiled_scores(q.compiled(), qg, x)
    want = run_int8(qg, torch.from_numpy(x), keep=())[qg.output].numpy()
    assert np.array_equal(got, want)


@pytest.mark.slow
def test_cli_validate_engine_c(cifar_path, capsys):
    from netquant.cli import main

    common = ["validate", "--data", str(cifar_path), "--calibration", "20", "--validation", "30", "--json"]
    assert main([*common, "--engine", "c"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert main(common) == 0
    py = json.loads(capsys.readouterr().out)
    assert (c["engine"], py["engine"]) == ("c", "python")
    assert c["metrics"] == py["metrics"] and c["agreement"] == py["agreement"]
