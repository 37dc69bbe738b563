"""Issue 17's bit-exactness at ImageNet size for the two networks test_codegen_scale does not
build: ResNet-18 (3x3 convs of 64..512 channels, the strided 7x7 stem, max pool) and MobileNetV2
(depthwise 3x3 convs, ReLU6, 1x1 expansions), torchvision's definitions at 224x224 with random
weights and non-trivial batch norms (bench/models.py), calibrated on upsampled CIFAR-10 images.
The generated C for this CPU's best kernels must equal the integer reference executor on every
output integer of two images (run one per thread), and of one image split across two threads
(ResNet-50 is in test_codegen_scale.py)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from netquant.codegen import build, generate, load
from netquant.quantizer import Quantizer
from netquant.ref.executor import run_int8

pytestmark = [pytest.mark.compiler, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model", ["resnet18", "mobilenetv2"])
def test_imagenet_network_is_bit_exact_at_224(model, cifar, tmp_path):
    sys.path.insert(0, str(ROOT))
    import bench.models as models

    q = Quantizer(getattr(models, model)(), example=torch.zeros(1, 3, 224, 224))
    q.calibrate(models.upsampled(cifar.train.images[:4]))
    qn = q.quantize()
    floats = [n.name for n in qn.qgraph.nodes if n.reason]
    assert not floats, floats                          # every layer runs in integers
    gen = generate(qn, tmp_path, name=model)
    net = load(gen, build(gen, cache_dir=tmp_path / "cache"))
    x = models.upsampled(cifar.test.images[:2])
    name = qn.qgraph.int_output()
    ref = run_int8(qn.qgraph, torch.from_numpy(x), keep=[name])[name].numpy()
    got = net.predict_int(x)
    assert got.shape == ref.shape == (2, 1000)
    assert np.array_equal(got, ref), f"{model}: {np.count_nonzero(got != ref)} of {ref.size} integers differ"
    # one image with 2 threads: its large convs split into items across the pool (c_pool.py)
    net.set_num_threads(2)
    assert np.array_equal(net.predict_int(x[:1]), ref[:1]), f"{model}: one image split across 2 threads"
