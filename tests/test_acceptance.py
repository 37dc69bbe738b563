"""The quantizer's acceptance numbers on the shipped cifarnet-20-16 and the first 1,000 real
CIFAR-10 test images: the MATLAB-style scheme's top-1 against float and the 1-LSB
executor/fake-quant bound of both schemes. (The full-set accuracy check of the default scheme
shares the full-set bit-exact check's reference run: test_codegen_c.py; the learnable memory
reduction is checked in test_quantizer.py's validation test.)"""
import pytest
import torch

from conftest import fresh_copy
from netquant.data.transforms import to_float
from netquant.ir.float_exec import run_float
from netquant.quant.config import TARGETS
from netquant.ref.executor import run_int8
from netquant.ref.fakequant import layerwise_lsb, run_fakequant

pytestmark = pytest.mark.slow
SUBSET = 1000   # images of the checks that need not run on the full set


def _top1(scores, labels):
    return 100.0 * float((scores.argmax(1) == labels).mean())


def _scheme(q, target):
    """The session's calibration (MATLAB's default: 200 random training images) under the
    quantization scheme of ``target``, on a copy."""
    qs = fresh_copy(q)
    qs.set_config(TARGETS[target])
    return qs


def test_matlab_scheme_top1_within_one_point(resnet20_quantizer, cifar):
    """Power-of-two per-tensor scales (scaled int8), the first 1,000 test images."""
    q = resnet20_quantizer
    x, labels = to_float(cifar.test.images[:SUBSET]), cifar.test.labels[:SUBSET]
    f = _top1(run_float(q.graph, torch.from_numpy(x), keep=())[q.graph.output].numpy(), labels)
    i = _top1(_scheme(q, "matlab").quantize().run(x), labels)
    print(f"\nmatlab: float {f:.2f}%, int8 {i:.2f}% on {len(x)} images")
    assert abs(f - i) <= 1.0


@pytest.mark.parametrize("target", ["gpu", "matlab"])
def test_executor_within_one_lsb_of_fake_quant(resnet20_quantizer, cifar, target):
    """Every integer output of every layer within 1 LSB of the fake-quant float simulation of the
    same integer network (fed the executor's own inputs), on the first 1,000 test images; end to
    end, top-1 of the integer executor and of the fake-quant network agree on >= 99.9% of them
    (test_quantizer.py checks the per-layer bound on 200 images in the quick tier)."""
    x = to_float(cifar.test.images[:SUBSET])
    qg = _scheme(resnet20_quantizer, target).quantize().qgraph
    worst, agree = 0, 0
    for i in range(0, len(x), 32):   # chunks: every layer's activations of the chunk are kept, and the
        xb = torch.from_numpy(x[i:i + 32])  # float64 passes ran 1.7x faster on 32 images than on 512
        worst = max(worst, max(layerwise_lsb(qg, xb).values()))
        fq = run_fakequant(qg, xb).numpy()
        iq = run_int8(qg, xb, keep=())[qg.output].numpy()
        agree += int((fq.argmax(1) == iq.argmax(1)).sum())
    print(f"\n{target}: max |int8 - fake-quant| = {worst} LSB; top-1 agreement {100 * agree / len(x):.2f}% "
          f"of {len(x)} images")
    assert worst <= 1
    assert agree / len(x) >= 0.999
