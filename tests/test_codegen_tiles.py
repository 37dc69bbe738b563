"""The register tiles' weight order and forms, and the generated thread pool (c_conv_simd.py,
c_pool.py), on a small network chosen to reach what ResNet-20 does not: a 7x7 stride-2 stem over
RGB (the AVX2 flat form), 24 output channels (3 blocks of 8: a group of 2 blocks and a last one of
1), convs of more than the pool's 1M MACs split into items at batch 1. Bit-exact with the
reference executor on the AVX2 kernels, their portable fallback (-DNQ_NO_SIMD, reading the same
packed weights), and with 1 and 2 threads."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from netquant.codegen import generate, load
from netquant.codegen.c_conv_simd import tile_order
from netquant.quantizer import Quantizer
from netquant.ref.executor import run_int8

pytestmark = pytest.mark.compiler


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


def test_tile_order_streams_each_block_group():
    """[KH][KW][CK][OB][LANES][K] -> per group of OBT blocks: [CK][KH*KW][blocks][LANES][K]; a
    last group of OB % OBT blocks. Example: 1 tap, 2 channel groups, 3 blocks, OBT 2."""
    w = np.arange(1 * 1 * 2 * 3 * 1 * 1).reshape(1, 1, 2, 3, 1, 1)   # value = ck * 3 + ob
    assert tile_order(w, 2).tolist() == [0, 1, 3, 4, 2, 5]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 24, 7, stride=2, padding=3), nn.ReLU(),
                        nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(24, 40, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(40, 10)).eval()
    q = Quantizer(net, example=torch.zeros(1, 3, 96, 96))
    q.calibrate(torch.rand(8, 3, 96, 96).numpy())
    return q.quantize()


@pytest.mark.parametrize("flag", ["", "-DNQ_NO_SIMD"])
def test_avx2_tiles_flat_stem_and_pool_are_bit_exact(small, flag, tmp_path):
    if not flag and not _has_avx2():
        pytest.skip("this CPU has no avx2")
    gen = generate(small, tmp_path, name="small", isa="avx2")
    src = (tmp_path / "small.c").read_text()
    assert "FLAT = 1" in src and "nq_run(" in src       # the stem in flat form, convs through the pool
    gen.cflags += f" {flag}"
    net = load(gen, cache_dir=tmp_path / "cache")
    assert net.kernels == ("portable" if flag else "avx2")
    x = torch.rand(3, 3, 96, 96).numpy()
    name = small.qgraph.int_output()
    ref = run_int8(small.qgraph, torch.from_numpy(x), keep=[name])[name].numpy()
    for threads in (2, 1):
        net.set_num_threads(threads)
        for i in range(len(x)):   # one image at a time: its convs split into items
            assert np.array_equal(net.predict_int(x[i:i + 1]), ref[i:i + 1]), (threads, i)
    assert gen.build["warnings"].strip() == "", gen.build["warnings"]
