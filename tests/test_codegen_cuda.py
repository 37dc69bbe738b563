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
    name = qnet.qgraph.int_output()
    ref = run_int8(qnet.qgraph, torch.from_numpy(x), keep=[name])[name].numpy()
    assert np.array_equal(net.predict_int(x), ref)


EMULATION = r"""
/* CPU emulation of the CUDA runtime for tests/test_codegen_cuda.py: kernels run as plain
 * functions, one call per (block, thread); device memory is host memory. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
struct nq_dim3 { unsigned x; };
static nq_dim3 blockIdx, threadIdx, blockDim;
enum { cudaSuccess = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
static int cudaMalloc(void **p, size_t n) { *p = calloc(1, n ? n : 1); return *p ? 0 : 1; }
static int cudaFree(void *p) { free(p); return 0; }
static int cudaMemcpy(void *d, const void *s, size_t n, int) { memcpy(d, s, n); return 0; }
static int cudaGetLastError(void) { return 0; }
static int cudaDeviceSynchronize(void) { return 0; }
static const char *cudaGetErrorString(int) { return "emulated"; }
/* PTX dp4a.u32.s32: four unsigned bytes of a times four signed bytes of b */
static inline int32_t nq_dp4a(uint32_t a, uint32_t b) {
    int32_t s = 0;
    for (int j = 0; j < 4; ++j) s += (int32_t)((a >> (8 * j)) & 255u) * (int32_t)(int8_t)((b >> (8 * j)) & 255u);
    return s;
}
"""


def emulate(cu_source: str) -> str:
    """The generated .cu rewritten to run on the CPU: launches become loops over (block, thread),
    the dp4a instruction becomes nq_dp4a. Everything else, indexing included, is unchanged."""
    import re

    src = cu_source.replace("#include <cuda_runtime.h>", EMULATION)
    src, n_asm = re.subn(r'asm\("dp4a\.u32\.s32 %0, %1, %2, %0;" : "\+r"\(acc\) : "r"\(xa\), "r"\(wb\)\);',
                         "acc += nq_dp4a(xa, wb);", src)
    assert n_asm > 0

    def launch(m):
        name, grid, block, args = m.group(1), m.group(2), m.group(3), m.group(4)
        return (f"for (unsigned nq_b = 0; nq_b < {grid}; ++nq_b) for (unsigned nq_t = 0; nq_t < {block}; ++nq_t) "
                f"{{ blockIdx.x = nq_b; threadIdx.x = nq_t; blockDim.x = {block}; {name}({args}); }}")

    src, n_launch = re.subn(r"(\w+)<<<(.+?), (\d+)>>>\((.*?)\);", launch, src)
    assert n_launch > 10
    return src


def test_cuda_kernels_compute_the_reference_integers_in_cpu_emulation(qnet, cifar, tmp_path):
    """Without a GPU: the generated kernels and host runtime, run thread by thread on the CPU
    (tests the indexing, memory plan, dp4a packing and requantization of the CUDA source)."""
    import subprocess

    from netquant.codegen.build import CompiledNetwork

    gen = generate(qnet, tmp_path, name="net", target="cuda")
    emu = tmp_path / "net_emulated.cpp"
    emu.write_text(emulate((tmp_path / "net.cu").read_text()))
    lib = tmp_path / "libnet_emulated.so"
    subprocess.run(["g++", "-O2", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-o", str(lib), str(emu)],
                   check=True, cwd=tmp_path, capture_output=True)
    net = CompiledNetwork(lib, gen.program)
    x = to_float(cifar.test.images[:12])
    name = qnet.qgraph.int_output()
    ref = run_int8(qnet.qgraph, torch.from_numpy(x), keep=[name])[name].numpy()
    assert np.array_equal(net.predict_int(x), ref)
    assert np.abs(net.predict(x) - qnet.run(x)).max() < 1e-6
    qin = run_int8(qnet.qgraph, torch.from_numpy(x), keep=["input_quantize"])["input_quantize"].numpy()
    assert np.array_equal(net.predict_int8(qin.astype(np.int8)), net.predict(x))
