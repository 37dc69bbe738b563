"""The netquant command on your own model and images: a torch CNN exported to ONNX, a folder of
real CIFAR-10 PNGs, quantize -> validate -> codegen through the real CLI, and the argument errors
(rc 2, one line, before any work)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from netquant.cli import main

import zoo

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch.onnx.export(dynamo=False)


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def own(cifar, tmp_path_factory):
    """net.onnx (zoo resnet_b, without normalisation: --mean/--std give it), a dynamic-size copy,
    and a folder of 30 real CIFAR-10 test images (3 per class) as PNG."""
    root = tmp_path_factory.mktemp("own")
    model = zoo.make("resnet_b")
    torch.onnx.export(model, torch.rand(1, 3, 32, 32), str(root / "net.onnx"), dynamo=False,
                      input_names=["image"], output_names=["scores"])
    torch.onnx.export(model, torch.rand(1, 3, 32, 32), str(root / "dyn.onnx"), dynamo=False,
                      input_names=["image"], output_names=["scores"],
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}})
    idx = np.concatenate([np.flatnonzero(cifar.test.labels == c)[:3] for c in range(10)])
    for i in idx:
        d = root / "images" / cifar.test.class_names[cifar.test.labels[i]]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(cifar.test.images[i].transpose(1, 2, 0)).save(d / f"{i:05d}.png")
    # the folder's order: classes sorted by name, files by name; labels = sorted-name positions
    # (CIFAR's class list is already alphabetical, so they are the CIFAR labels)
    images, labels = cifar.test.images[idx], cifar.test.labels[idx]
    with torch.no_grad():
        x = (torch.from_numpy(images).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        top1 = 100 * float((model(x).argmax(1).numpy() == labels).mean())
    return root, top1


@pytest.mark.slow
@pytest.mark.compiler
def test_quantize_validate_codegen_own_onnx_and_folder(own, capsys):
    root, torch_top1 = own
    nq, images = root / "net.nq", root / "images"
    rc, out, err = run(capsys, "quantize", "--model", root / "net.onnx", "--data", images, "--out", nq,
                       "--mean", *MEAN, "--std", *STD)
    assert rc == 0, err
    assert nq.exists() and f"saved the quantizer to {nq}" in out and "input_spec" in out   # the normalisation node
    assert f"calibrating on 30 images (image folder {images}: 30 images, 10 classes)" in err
    rc, out, err = run(capsys, "validate", "--quantizer", nq, "--data", images, "--validation", "all", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["num_samples"] == 30 and d["source"] == f"image folder {images}: 30 images, 10 classes"
    top1 = {r["NetworkImplementation"]: r["MetricOutput"] for r in d["metrics"]["top1"]}
    assert top1["Floating-Point"] == pytest.approx(torch_top1)   # percent; the float graph is the torch model
    rc, out, err = run(capsys, "codegen", "--quantizer", nq, "--out", root / "c")
    assert rc == 0, err
    assert (root / "c" / "net.c").exists() and (root / "c" / "report.html").exists() and "built " in out


def test_analyze_onnx_safetensors_and_input_size(own, capsys, tmp_path):
    root, _ = own
    rc, out, err = run(capsys, "analyze", "--model", root / "net.onnx", "--json")
    d = json.loads(out)
    assert rc == 0 and d["network"] == "net" and d["input_shape"] == [3, 32, 32] and d["outputs"] == 10
    convs = [m for m in zoo.make("resnet_b").modules() if isinstance(m, torch.nn.Conv2d)]
    # batch norms folded into the convs, which gain a bias each; plus the fc layer (32*10 + 10)
    assert d["parameters"] == sum(c.weight.numel() + c.out_channels for c in convs) + 330
    rc, out, err = run(capsys, "analyze", "--model", root / "dyn.onnx", "--input-size", 40, 48, "--json")
    assert rc == 0, err
    assert json.loads(out)["input_shape"] == [3, 40, 48]
    # evaluate resizes the 32x32 PNGs to the 40x48 the model is given
    rc, out, err = run(capsys, "evaluate", "--model", root / "dyn.onnx", "--input-size", 40, 48, "--data",
                       root / "images", "--mean", *MEAN, "--std", *STD, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["images"] == 30 and d["data"].endswith("resized to cover 40x48 + centre crop")
    from netquant.models.pretrained import save_pretrained
    from netquant.models.resnet import resnet

    torch.manual_seed(0)
    save_pretrained(resnet(net_width=4, num_units=3).eval(), tmp_path, {"status": "test"})
    (file,) = tmp_path.glob("*.safetensors")
    rc, out, err = run(capsys, "analyze", "--model", file, "--json")
    assert rc == 0 and json.loads(out)["network"] == file.stem


def test_argument_errors_are_one_line_before_any_work(own, capsys, tmp_path):
    root, _ = own
    net, images = root / "net.onnx", root / "images"
    (tmp_path / "net.pt").write_bytes(b"\x80\x02 a pickle")
    cases = [
        (("validate", "--quantizer", root / "missing.nq", "--model", net), "--quantizer and --model together"),
        (("quantize", "--model", tmp_path / "net.pt"), "net.pt: a PyTorch pickle file; netquant never unpickles"),
        (("quantize", "--model", tmp_path / "none.onnx"), "none.onnx: no such model file"),
        (("quantize", "--model", net, "--data", tmp_path / "nothing"), "nothing: no such file or folder"),
        (("quantize", "--model", net, "--mean", 0.5, 0.5, "--std", 0.2), "--mean has 2 values and --std 1"),
        (("quantize", "--model", net, "--std", 0.2, 0, 0.2), "--std: every value must be > 0"),
        (("quantize", "--model", net, "--value-range", 255, 0), "--value-range: expected LOW HIGH with LOW < HIGH"),
        (("validate", "--quantizer", net, "--mean", 0.5, 0.5, 0.5), "--mean with --quantizer"),
        (("evaluate", "--model", net, "--class-names", tmp_path / "names.txt"), "names.txt: no such file"),
        (("quantize", "--model", net, "--resize", 0), "--resize: expected a positive shorter side"),
    ]
    for argv, message in cases:
        rc, out, err = run(capsys, *argv)
        assert rc == 2 and message in err and err.count("\n") == 1 and out == "", (argv, err)


def test_labels_past_the_network_outputs_are_refused(own, capsys, tmp_path):
    root, _ = own
    x = np.zeros((4, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "eleven.npz", images=x, labels=np.array([0, 1, 2, 11]))
    rc, _, err = run(capsys, "quantize", "--model", root / "net.onnx", "--data", tmp_path / "eleven.npz")
    assert rc == 2 and "label 11 (11) but the network has 10 outputs" in err


def test_load_network_reads_onnx_shipped_and_refuses_pickles(own, tmp_path):
    from netquant.models.files import ModelFileError, load_network

    root, _ = own
    graph, name = load_network(root / "dyn.onnx", input_shape=(24, 40))   # C from the file
    assert name == "dyn" and graph.input.shape == (3, 24, 40)
    graph, name = load_network("cifarnet-20-16")
    assert name == "cifarnet-20-16" and graph.input.shape == (3, 32, 32) and graph.node(graph.output).shape == (10,)
    (tmp_path / "model.pth").write_bytes(b"\x80\x02")
    with pytest.raises(ModelFileError, match="model.pth: a PyTorch pickle file.*torch.onnx.export"):
        load_network(tmp_path / "model.pth")
    with pytest.raises(ModelFileError, match="no pretrained network named 'resnet-9000'"):
        load_network("resnet-9000")
