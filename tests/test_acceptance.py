"""The quantizer's acceptance numbers on the shipped cifarnet-20-16 and the full real CIFAR-10
test set (10,000 images): int8 top-1 against float for the default and the MATLAB-style scheme,
and the learnable memory reduction."""
import numpy as np
import pytest

from netquant.data import calibration_set
from netquant.data.transforms import to_float
from netquant.ir.float_exec import run_float
from netquant.models.pretrained import load_pretrained
from netquant.quant.config import TARGETS
from netquant.quantizer import Quantizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(cifar):
    import torch

    q = Quantizer(load_pretrained("cifarnet-20-16"))
    q.calibrate(calibration_set(cifar))  # MATLAB's default: 200 random training images
    x = to_float(cifar.test.images)
    fl = np.concatenate([run_float(q.graph, torch.from_numpy(x[i:i + 1000]), keep=())[q.graph.output].numpy()
                         for i in range(0, len(x), 1000)])
    return q, x, fl


def _top1(scores, labels):
    return 100.0 * float((scores.argmax(1) == labels).mean())


@pytest.mark.parametrize("target,tolerance", [("gpu", 0.3),      # per-channel float scales
                                               ("matlab", 1.0)])  # power-of-two per-tensor (scaled int8)
def test_int8_top1_close_to_float(setup, cifar, target, tolerance):
    q, x, fl = setup
    q.set_config(TARGETS[target])
    qs = q.quantize().run(x)
    q.set_config(TARGETS["gpu"])
    f, i = _top1(fl, cifar.test.labels), _top1(qs, cifar.test.labels)
    print(f"\n{target}: float {f:.2f}%, int8 {i:.2f}% on {len(x)} images")
    assert abs(f - i) <= tolerance


def test_memory_reduced_by_74_percent(setup):
    q, _, _ = setup
    fmem, qmem = q.learnable_memory()
    assert fmem == 1_089_896
    assert 1 - qmem / fmem >= 0.74, (fmem, qmem)


def test_card_accuracy_is_what_the_weights_give(setup, cifar):
    q, x, fl = setup
    card = load_pretrained("cifarnet-20-16").card
    assert abs(_top1(fl, cifar.test.labels) - card["test_top1"]) < 0.05


@pytest.mark.parametrize("target", ["gpu", "matlab"])
def test_executor_within_one_lsb_of_fake_quant_on_the_full_test_set(setup, cifar, target):
    """Every integer output of every layer within 1 LSB of the fake-quant float simulation of the
    same integer network (fed the executor's own inputs), on all 10,000 test images; end to end,
    top-1 of the integer executor and of the fake-quant network agree on >= 99.9% of them."""
    import torch

    from netquant.ref.executor import run_int8
    from netquant.ref.fakequant import layerwise_lsb, run_fakequant

    q, x, _ = setup
    q.set_config(TARGETS[target])
    qg = q.quantize().qgraph
    q.set_config(TARGETS["gpu"])
    worst, agree = 0, 0
    for i in range(0, len(x), 500):   # chunks: every layer's activations of the chunk are kept
        xb = torch.from_numpy(x[i:i + 500])
        worst = max(worst, max(layerwise_lsb(qg, xb).values()))
        fq = run_fakequant(qg, xb).numpy()
        iq = run_int8(qg, xb, keep=())[qg.output].numpy()
        agree += int((fq.argmax(1) == iq.argmax(1)).sum())
    print(f"\n{target}: max |int8 - fake-quant| = {worst} LSB; top-1 agreement {100 * agree / len(x):.2f}% "
          f"of {len(x)} images")
    assert worst <= 1
    assert agree / len(x) >= 0.999
