"""Residual network builder and analysis: names, depth, parameter counts, bad sizes."""
import pytest
import torch

from netquant.models import resnet
from netquant.models.analyze import analyze


@pytest.mark.parametrize("unit_type,num_units,depth,params", [
    ("standard", 3, 8, 78_042),
    ("standard", 9, 20, 272_474),     # ResNet-20: He et al. quote 0.27M
    ("standard", 18, 38, 564_122),
    ("bottleneck", 3, 11, 127_642),
    ("bottleneck", 9, 29, 313_114),
])
def test_depth_and_parameters(unit_type, num_units, depth, params):
    a = analyze(resnet(16, num_units, unit_type))
    assert a.depth == depth
    assert a.parameters == params
    assert a.learnable_bytes == 4 * params
    convs = sum(1 for l in a.layers if l.type == "Conv2d" and not l.name.endswith("convSkip"))
    assert convs + 1 == depth  # every conv on the main path, plus fcFinal


def test_resnet20_layer_names_and_shapes():
    a = analyze(resnet())
    names = [l.name for l in a.layers]
    assert names[:4] == ["input", "convInp", "bnInp", "reluInp"]
    assert names[4:11] == ["S1U1_conv1", "S1U1_bn1", "S1U1_relu1", "S1U1_conv2", "S1U1_bn2", "add11", "relu11"]
    assert names[-3:] == ["globalPool", "fcFinal", "softmax"]
    assert {"S2U1_convSkip", "S2U1_bnSkip", "S3U1_convSkip", "add33", "relu33"} <= set(names)
    shapes = {l.name: l.output_shape for l in a.layers}
    assert shapes["relu13"] == (16, 32, 32) and shapes["relu21"] == (32, 16, 16) and shapes["relu33"] == (64, 8, 8)
    assert a.macs == 40_813_184
    assert dict(zip(names, [l.macs for l in a.layers]))["convInp"] == 16 * 32 * 32 * 27


def test_bottleneck_widths_and_projection():
    net = resnet(16, 3, "bottleneck")
    assert net.S1U1_conv1.kernel_size == (1, 1) and net.S1U1_conv3.out_channels == 64
    assert net.S1U1_convSkip.out_channels == 64  # 16 -> 64 channels needs a projection
    assert net.S2U1_conv2.stride == (2, 2) and net.S2U1_conv1.stride == (1, 1)
    out = net(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.allclose(out.sum(1), torch.ones(2))


@pytest.mark.parametrize("kwargs,match", [
    ({"num_units": 4}, "num_units must be a multiple of 3"),
    ({"num_units": 0}, "num_units must be a positive integer"),
    ({"net_width": -8}, "net_width must be a positive integer"),
    ({"unit_type": "wide"}, "unit_type must be one of"),
])
def test_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resnet(**kwargs)


def test_analysis_table_columns():
    t = analyze(resnet()).table()
    assert list(t.columns) == ["Name", "Type", "Output", "Learnables", "Parameters", "MACs"]
    row = t[t.Name == "fcFinal"].iloc[0]
    assert row.Learnables == "Weights 10x64, Bias 10" and row.Parameters == 650
