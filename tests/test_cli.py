"""The netquant command on real data: analysis, tile, evaluation, calibrate/quantize/validate
round trip through a saved quantizer, JSON output and clear errors."""
import json

import pytest
from PIL import Image

from netquant.cli import main
from netquant.data import validation_set
from netquant.models.pretrained import load_pretrained
from netquant.models.train import evaluate


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_analyze(capsys):
    rc, out, _ = run(capsys, "analyze")
    assert rc == 0
    assert "depth 20" in out and "272,474 parameters (0.27M)" in out and "1,089,896 bytes (1.09 MB)" in out
    rc, out, _ = run(capsys, "analyze", "--json")
    d = json.loads(out)
    assert d["depth"] == 20 and d["parameters"] == 272_474 and d["layers"][1]["name"] == "convInp"


def test_tile(capsys, cifar_path, tmp_path):
    rc, out, _ = run(capsys, "tile", "--data", str(cifar_path), "--out", str(tmp_path / "t.png"))
    assert rc == 0 and "20 random images (seed 0) from CIFAR-10 training set (binary" in out
    assert Image.open(tmp_path / "t.png").size == (332, 266)


def test_evaluate_names_its_data(capsys, cifar, cifar_path):
    rc, out, _ = run(capsys, "evaluate", "--data", str(cifar_path), "--count", "300", "--json")
    d = json.loads(out)
    assert d["images"] == 300 and "CIFAR-10 test set (binary" in d["data"]
    # the top-1 printed is the shipped network's on the 300 random test images (seed 0) it names
    want = evaluate(load_pretrained(), validation_set(cifar, 300, 0))
    assert d["top1"] == pytest.approx(want, abs=1e-9)


@pytest.mark.slow   # 26 s on 2 cores: every command in its own process
def test_calibrate_quantize_validate_round_trip(capsys, cifar_path, tmp_path):
    nq = tmp_path / "r20.nq"
    rc, out, _ = run(capsys, "calibrate", "--data", str(cifar_path), "--calibration", "100", "--out", str(nq))
    assert rc == 0 and "Optimized Layer Name" in out and "convInp_reluInp_Weights" in out and nq.exists()
    rc, out, _ = run(capsys, "quantize", "--data", str(cifar_path), "--quantizer", str(nq), "--float", "fcFinal",
                     "--out", str(tmp_path / "q2.nq"), "--json")
    d = json.loads(out[: out.rindex("}") + 1])
    fc = next(r for r in d["layers"] if r["Layer"] == "fcFinal")
    assert not fc["Quantized"] and "user" in fc["Reason"] and d["float_bytes"] == 1_089_896
    rc, out, _ = run(capsys, "validate", "--data", str(cifar_path), "--quantizer", str(nq), "--validation", "100",
                     "--metric", "top1", "--metric", "netquant.metrics:top5", "--json")
    d = json.loads(out[out.index("{"):])
    assert d["num_samples"] == 100 and set(d["metrics"]) == {"top1", "top5"}
    assert [r["NetworkImplementation"] for r in d["metrics"]["top1"]] == ["Floating-Point", "Quantized"]


def test_errors_are_clear(capsys, tmp_path):
    rc, _, err = run(capsys, "evaluate", "--data", str(tmp_path / "missing.tar.gz"))
    assert rc == 2 and "missing.tar.gz: no such file" in err
    rc, _, err = run(capsys, "validate", "--quantizer", str(tmp_path / "none.nq"))
    assert rc == 2 and "none.nq: no such file" in err
    with pytest.raises(SystemExit):
        main(["analyze", "--model"])
    rc, _, err = run(capsys, "analyze", "--model", "resnet-9000")
    assert rc == 2 and "no pretrained network named 'resnet-9000'" in err
