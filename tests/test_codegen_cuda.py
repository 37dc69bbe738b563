"""CUDA code generation: the generated .cu builds with nvcc for sm_75, sm_80 and sm_90 with no
error and no warning (compile-only here: these machines have nvcc and no GPU). With a GPU the
library must equal the integer reference executor bit for bit (bench/gpu_check.py does the full
test set and the speed)."""
import shutil

import numpy as np
import pytest
import torch

from netquant.codegen import build, generate, load
from netquant.data import calibration_set
from netquant.data.transforms import to_float
from netquant.models.pretrained import load_pretrained
from netquant.quantizer import Quantizer
from netquant.ref.executor import run_int8

pytestmark = pytest.mark.compiler
NVCC = shutil.which("nvcc")


@pytest.fixture(scope="module")
def qnet(cifar):
    q = Quantizer(load_pretrained())
    q.calibrate(calibration_set(cifar))
    return q.quantize()


@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_90"])
def test_builds_without_warnings(qnet, tmp_path, arch):
    if NVCC is None:
        pytest.skip("nvcc not installed")
    gen = generate(qnet, tmp_path, name="resnet20", target="cuda", arch=arch)
    src = (tmp_path / "resnet20.cu").read_text()
    assert "dp4a.u32.s32" in src and "__global__" in src and "resnet20_predict_device" in src
    lib = build(gen)
    assert lib.exists() and gen.build["warnings"].strip() == "", gen.build["warnings"]
    assert f"-arch={arch}" in gen.build["command"] and "--fmad=false" in gen.build["command"]


def test_cuda_sources_share_the_program(qnet, tmp_path):
    c = generate(qnet, tmp_path / "c", name="net")
    cu = generate(qnet, tmp_path / "cu", name="net", target="cuda")
    assert c.program.arena_bytes == cu.program.arena_bytes
    assert [s.node.name for s in c.program.steps] == [s.node.name for s in cu.program.steps]
    assert (tmp_path / "c" / "netquant_rt.h").read_text() == (tmp_path / "cu" / "netquant_rt.h").read_text()


@pytest.mark.gpu
def test_bit_exact_on_a_gpu(qnet, cifar, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no GPU here (bench/gpu_check.py runs this on the full test set where one is lent)")
    major, minor = torch.cuda.get_device_capability()
    net = load(generate(qnet, tmp_path, name="net", target="cuda", arch=f"sm_{major}{minor}"))
    x = to_float(cifar.test.images[:1000])
    deq = qnet.qgraph.node(qnet.qgraph.output)
    while deq.op != "dequantize":
        deq = qnet.qgraph.node(deq.inputs[0])
    ref = run_int8(qnet.qgraph, torch.from_numpy(x), keep=[deq.inputs[0]])[deq.inputs[0]].numpy()
    assert np.array_equal(net.predict_int(x), ref)
