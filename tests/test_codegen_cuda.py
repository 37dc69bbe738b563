"""CUDA code generation: the generated .cu builds with nvcc for sm_75, sm_80 and sm_90 with no
error and no warning (compile-only here: these machines have nvcc and no GPU). With a GPU the
library must equal the integer reference executor bit for bit (bench/gpu_check.py does the full
test set and the speed)."""
import shutil

import re

import numpy as np
import pytest
import torch

from netquant.codegen import build, generate, load
from netquant.data import calibration_set
from netquant.data.transforms import to_float
from netquant.quantizer import Quantizer
from netquant.ref.executor import run_int8

pytestmark = pytest.mark.compiler
NVCC = shutil.which("nvcc")


@pytest.fixture(scope="module")
def qnet(resnet20_quantizer):
    return resnet20_quantizer.quantize()


# one nvcc build in the quick tier (12 s of CPU); the other architectures in one fat-binary build per
# kernel kind (the source is the same for each: a second architecture adds its device compilation only)
@pytest.mark.parametrize("arch,tensor_cores", [("sm_75", False), pytest.param("sm_80,sm_90", True, marks=pytest.mark.slow),
                                               pytest.param("sm_90,sm_100", False, marks=pytest.mark.slow)])
def test_builds_without_warnings(qnet, tmp_path, arch, tensor_cores):
    if NVCC is None:
        pytest.skip("nvcc not installed")
    gen = generate(qnet, tmp_path, name="resnet20", target="cuda", arch=arch, tensor_cores=tensor_cores)
    src = (tmp_path / "resnet20.cu").read_text()
    assert "__global__" in src and "resnet20_predict_device" in src
    assert ("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32" in src) == tensor_cores
    assert ("dp4a.u32.s32" in src) != tensor_cores
    lib = build(gen)
    assert lib.exists() and gen.build["warnings"].strip() == "", gen.build["warnings"]
    assert "--fmad=false" in gen.build["command"]
    archs = arch.split(",")
    # ptxas -v: every __global__ kernel compiled for every architecture, none spilling registers
    kernels = gen.build["device_kernels"]
    bounds = r"(?:__launch_bounds__\([^)]*\)\s+)?"
    globals_ = set(re.findall(rf"__global__\s+{bounds}void\s+{bounds}(\w+)\s*\(", src))
    assert globals_ and {(k["kernel"], k["arch"]) for k in kernels} >= {(g, a) for g in globals_ for a in archs}
    assert all(k["registers"] > 0 for k in kernels), kernels
    spills = [k for k in kernels if k["spill_stores"] or k["spill_loads"]]
    assert not spills, spills
    assert "Device kernels (ptxas)" in (tmp_path / "report.html").read_text()
    if len(archs) == 1:
        assert f"-arch={arch}" in gen.build["command"]
    else:   # the library holds machine code for each architecture
        for a in archs:
            assert f"-gencode arch=compute_{a[3:]},code={a}" in gen.build["command"]


def test_tensor_cores_need_sm_80(qnet, tmp_path):
    for arch in ("sm_75", "sm_75,sm_90"):   # every architecture of a fat binary must have them
        with pytest.raises(ValueError, match="sm_80"):
            generate(qnet, tmp_path, name="net", target="cuda", arch=arch, tensor_cores=True)
    with pytest.raises(ValueError, match="sm_XY"):
        generate(qnet, tmp_path, name="net", target="cuda", arch="sm_90,")


def test_cuda_sources_share_the_program(qnet, tmp_path):
    """The CUDA printer prints the plan the C printer prints (no plan of its own): the plan's
    steps, its arena size (rounded up to 64 bytes for fragment loads) and every arena tensor at
    the plan's offset in the .cu text; and the same runtime header."""
    from netquant.codegen.program import plan

    generate(qnet, tmp_path / "c", name="net")
    cu = generate(qnet, tmp_path / "cu", name="net", target="cuda")
    p = plan(qnet.qgraph, "net")
    assert [s.node.name for s in cu.program.steps] == [s.node.name for s in p.steps]
    src = (tmp_path / "cu" / "net.cu").read_text()
    assert f"#define ARENA_BYTES {-(-max(p.arena_bytes, 64) // 64) * 64}" in src
    offsets = {p.buffer(s.output).offset for s in p.steps if p.buffer(s.output).offset >= 0}
    assert len(offsets) > 3 and all(f"ARENA_BYTES + {o})" in src for o in offsets), sorted(offsets)
    assert (tmp_path / "c" / "netquant_rt.h").read_text() == (tmp_path / "cu" / "netquant_rt.h").read_text()


@pytest.mark.gpu
@pytest.mark.parametrize("tensor_cores", [False, True], ids=["dp4a", "mma"])
def test_bit_exact_on_a_gpu(qnet, cifar, tmp_path, tensor_cores):
    if not torch.cuda.is_available():
        pytest.skip("no GPU here (bench/gpu_check.py runs this on the full test set where one is lent)")
    major, minor = torch.cuda.get_device_capability()
    if tensor_cores and major < 8:
        pytest.skip("int8 mma.sync.m16n8k32 needs sm_80 or newer")
    net = load(generate(qnet, tmp_path, name="net", target="cuda", arch=f"sm_{major}{minor}",
                        tensor_cores=tensor_cores))
    x = to_float(cifar.test.images[:1000])
    name = qnet.qgraph.int_output()
    ref = run_int8(qnet.qgraph, torch.from_numpy(x), keep=[name])[name].numpy()
    assert np.array_equal(net.predict_int(x), ref)


EMULATION = r"""
/* CPU emulation of the CUDA runtime for tests/test_codegen_cuda.py: the 32 lanes of a warp run as
 * coroutines (ucontext) on the CPU; device memory is host memory. A lane that reaches mma.sync
 * parks until all 32 lanes have, then the warp-wide product is formed from every lane's
 * fragments (PTX ISA layout of mma.m16n8k32 with 8-bit operands) and each lane resumes with its
 * accumulators, which is what the warp-synchronous instruction does on a GPU. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <functional>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __align__(x) __attribute__((aligned(x)))
#define __ldg(p) (*(p))
struct nq_dim3 { unsigned x; };
static nq_dim3 blockIdx, blockDim;
enum { cudaSuccess = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
typedef int cudaError_t;
static int cudaMalloc(void **p, size_t n) { *p = calloc(1, n ? n : 1); return *p ? 0 : 2; }  /* 2: out of memory */
static int cudaFree(void *p) { free(p); return 0; }
static int cudaMemcpy(void *d, const void *s, size_t n, int) { memcpy(d, s, n); return 0; }
static int cudaGetLastError(void) { return 0; }
template <class T> static int cudaMemcpyToSymbol(T &symbol, const void *src, size_t n) { memcpy((void *)&symbol, src, n); return 0; }
static int cudaDeviceSynchronize(void) { return 0; }
static const char *cudaGetErrorString(int e) { return e == 2 ? "out of memory" : "emulated"; }
/* PTX dp4a.u32.s32: four unsigned bytes of a times four signed bytes of b */
static inline int32_t nq_dp4a(uint32_t a, uint32_t b) {
    int32_t s = 0;
    for (int j = 0; j < 4; ++j) s += (int32_t)((a >> (8 * j)) & 255u) * (int32_t)(int8_t)((b >> (8 * j)) & 255u);
    return s;
}

struct NqLane { ucontext_t ctx; nq_dim3 tid; bool done, parked; int32_t *acc; uint32_t a[4], b[2]; };
static NqLane nq_lane[32];
static int nq_cur = 0;
static ucontext_t nq_sched;
static std::function<void()> nq_body;
#define threadIdx (nq_lane[nq_cur].tid)
static char nq_stacks[32][1 << 16];

static void nq_lane_entry() { nq_body(); nq_lane[nq_cur].done = true; swapcontext(&nq_lane[nq_cur].ctx, &nq_sched); }

/* D = A (16x32 u8, row) x B (32x8 s8, col) + C over the 32 parked lanes: lane = 4g + t holds
 * A[g + 8(r&1)][16(r>>1) + 4t + byte] in register r, B[16h + 4t + byte][g] in register h, and
 * C[g + 8(j>>1)][2t + (j&1)] in accumulator j. */
static void nq_mma_warp() {
    uint8_t A[16][32]; int8_t B[32][8]; int32_t D[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int r = 0; r < 4; ++r)
            for (int by = 0; by < 4; ++by) A[g + 8 * (r & 1)][16 * (r >> 1) + 4 * t + by] = (uint8_t)(nq_lane[l].a[r] >> (8 * by));
        for (int h = 0; h < 2; ++h)
            for (int by = 0; by < 4; ++by) B[16 * h + 4 * t + by][g] = (int8_t)(uint8_t)(nq_lane[l].b[h] >> (8 * by));
    }
    for (int l = 0; l < 32; ++l)
        for (int j = 0; j < 4; ++j) D[(l >> 2) + 8 * (j >> 1)][2 * (l & 3) + (j & 1)] = nq_lane[l].acc[j];
    for (int m = 0; m < 16; ++m)
        for (int c = 0; c < 8; ++c)
            for (int k = 0; k < 32; ++k) D[m][c] += (int32_t)A[m][k] * (int32_t)B[k][c];
    for (int l = 0; l < 32; ++l)
        for (int j = 0; j < 4; ++j) nq_lane[l].acc[j] = D[(l >> 2) + 8 * (j >> 1)][2 * (l & 3) + (j & 1)];
}

static void nq_mma_sync(int32_t *acc, const uint32_t *a, uint32_t b0, uint32_t b1) {
    NqLane &me = nq_lane[nq_cur];
    me.acc = acc; memcpy(me.a, a, sizeof me.a); me.b[0] = b0; me.b[1] = b1; me.parked = true;
    swapcontext(&me.ctx, &nq_sched);
}

/* one block: warps one after another, the lanes of a warp interleaved at each mma.sync (kernels
 * without warp-wide instructions run thread after thread, no coroutines needed) */
static void nq_run_block(unsigned threads, bool warp_sync, const std::function<void()> &body) {
    if (!warp_sync) {
        nq_cur = 0;
        for (unsigned t = 0; t < threads; ++t) { nq_lane[0].tid.x = t; body(); }
        return;
    }
    nq_body = body;
    for (unsigned w0 = 0; w0 < threads; w0 += 32) {
        const int lanes = (int)(threads - w0 < 32 ? threads - w0 : 32);
        for (int l = 0; l < lanes; ++l) {
            nq_lane[l].tid.x = w0 + l; nq_lane[l].done = nq_lane[l].parked = false;
            getcontext(&nq_lane[l].ctx);
            nq_lane[l].ctx.uc_stack.ss_sp = nq_stacks[l]; nq_lane[l].ctx.uc_stack.ss_size = sizeof nq_stacks[l];
            nq_lane[l].ctx.uc_link = NULL;
            makecontext(&nq_lane[l].ctx, nq_lane_entry, 0);
        }
        for (;;) {
            int parked = 0, done = 0;
            for (int l = 0; l < lanes; ++l) {
                if (!nq_lane[l].done && !nq_lane[l].parked) { nq_cur = l; swapcontext(&nq_sched, &nq_lane[l].ctx); }
                parked += nq_lane[l].parked; done += nq_lane[l].done;
            }
            if (done == lanes) break;
            if (parked != 32) abort();  /* mma.sync reached by part of a warp: undefined on a GPU */
            nq_mma_warp();
            for (int l = 0; l < lanes; ++l) nq_lane[l].parked = false;
        }
    }
}
"""


def emulate(cu_source: str) -> str:
    """The generated .cu rewritten to run on the CPU: launches become loops over blocks whose warps
    run lane by lane (see EMULATION), dp4a becomes nq_dp4a and mma.sync becomes nq_mma_sync.
    Everything else, indexing included, is unchanged."""
    import re

    src = cu_source.replace("#include <cuda_runtime.h>", EMULATION)
    src, n_asm = re.subn(r'asm\("dp4a\.u32\.s32 %0, %1, %2, %0;" : "\+r"\(acc\) : "r"\(xa\), "r"\(wb\)\);',
                         "acc += nq_dp4a(xa, wb);", src)
    src, n_mma = re.subn(r'asm volatile\("mma\.sync\.aligned\.m16n8k32\.row\.col\.s32\.u8\.s8\.s32 [^;]*;"\s*'
                         r':[^:]*:\s*"r"\(af\[i\]\[0\]\)[^;]*\);',
                         "nq_mma_sync(acc[i][q], af[i], b0, b1);", src)
    assert n_asm + n_mma > 0 and 'asm volatile("mma' not in src
    warp_kernels = set(re.findall(r"__launch_bounds__\(\d+\) (\w+)\(", cu_source))

    def launch(m):
        name, grid, block, args = m.group(1), m.group(2), m.group(3), m.group(4)
        return (f"for (unsigned nq_b = 0; nq_b < {grid}; ++nq_b) {{ blockIdx.x = nq_b; blockDim.x = {block}; "
                f"nq_run_block({block}, {'true' if name in warp_kernels else 'false'}, [&] {{ {name}({args}); }}); }}")

    src, n_launch = re.subn(r"(\w+)<<<(.+?), (\d+)>>>\((.*?)\);", launch, src)
    assert n_launch > 2 and "<<<" not in src   # every launch rewritten
    return src


@pytest.mark.parametrize("tensor_cores", [False, pytest.param(True, marks=pytest.mark.slow)],  # mma: 26 s
                         ids=["dp4a", "mma"])
def test_cuda_kernels_compute_the_reference_integers_in_cpu_emulation(qnet, cifar, tmp_path, tensor_cores):
    """Without a GPU: the generated kernels and host runtime, run lane by lane on the CPU (tests
    the indexing, memory plan, dp4a packing, tensor-core fragments (sm_90) and requantization of
    the CUDA source; the GPU check confirms it on the hardware)."""
    net = _emulated(qnet.qgraph, tmp_path, tensor_cores)
    assert ("asm volatile(\"mma.sync" in (tmp_path / "net.cu").read_text()) == tensor_cores
    x = to_float(cifar.test.images[:4])   # emulated lane by lane: about 0.25 s per image and call
    name = qnet.qgraph.int_output()
    ref = run_int8(qnet.qgraph, torch.from_numpy(x), keep=[name])[name].numpy()
    assert np.array_equal(net.predict_int(x), ref)
    assert np.abs(net.predict(x) - qnet.run(x)).max() < 1e-6
    qin = run_int8(qnet.qgraph, torch.from_numpy(x), keep=["input_quantize"])["input_quantize"].numpy()
    assert np.array_equal(net.predict_int8(qin.astype(np.int8)), net.predict(x))
    # a CUDA call that fails (cudaMalloc of 2^31 - 1 arenas): NQ_ERR_RUNTIME, and the message is
    # that call's own code (the emulated cudaGetLastError always reports success)
    import ctypes

    f = ctypes.POINTER(ctypes.c_float)
    device = net.lib.net_predict_device
    device.argtypes, device.restype = [f, ctypes.c_size_t, ctypes.c_int, f, ctypes.c_size_t], ctypes.c_int
    dummy = np.zeros(1, np.float32).ctypes.data_as(f)
    n = 2 ** 31 - 1
    assert device(dummy, n * 3072, n, dummy, n * 10) == 3
    assert net.error_string(3) == "out of memory"
    assert np.array_equal(net.predict_int(x), ref)   # and the next call allocates again and runs


class _Wide(torch.nn.Module):
    """Tensor-core convs wider than one warp's columns and deeper than a few k steps: 16 -> 256
    channels (K = 144: 5 k steps, 4 column groups of 64) and 256 -> 128 strided (K = 2304: 72
    k steps, 2 groups), between an RGB conv and a linear head that stay on their own kernels."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.wide = torch.nn.Conv2d(16, 256, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(256)
        self.down = torch.nn.Conv2d(256, 128, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(128, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.wide(torch.relu(self.stem(x[:, :, :12, :12])))))
        return self.fc(torch.relu(self.down(x)).mean((2, 3)))


@pytest.mark.slow   # the emulation and an nvcc build for two architectures: ~1 min
def test_wide_tensor_core_convs_in_column_groups(cifar, tmp_path):
    """Convs of 128 and 256 output channels run as warps over column groups with a loop over the
    k steps (mma_tiles): the same integers as the reference in the warp emulation, and the nvcc
    build for sm_80 and sm_90 spills no register (one warp's accumulators: 2 x 8 x 4)."""
    torch.manual_seed(0)
    q = Quantizer(_Wide().eval(), example=torch.zeros(1, 3, 32, 32))
    q.calibrate(to_float(cifar.train.images[:32]))
    qn = q.quantize()
    net = _emulated(qn.qgraph, tmp_path, tensor_cores=True)
    src = (tmp_path / "net.cu").read_text()
    assert src.count("NG = 4 }") == 1 and src.count("NG = 2 }") == 1 and "KSTEPS = 72" in src
    x = to_float(cifar.test.images[:2])
    name = qn.qgraph.int_output()
    ref = run_int8(qn.qgraph, torch.from_numpy(x), keep=[name])[name].numpy()
    assert np.array_equal(net.predict_int(x), ref)
    if NVCC is None:
        return
    gen = generate(qn, tmp_path / "nvcc", name="wide", target="cuda", arch="sm_80,sm_90", tensor_cores=True)
    build(gen)
    kernels = gen.build["device_kernels"]
    assert gen.build["warnings"].strip() == "" and kernels
    assert not [k for k in kernels if k["spill_stores"] or k["spill_loads"]], kernels


def _emulated(qgraph, folder, tensor_cores=False):
    """The CUDA library of ``qgraph`` built for the CPU emulation (see ``emulate``) and loaded."""
    import subprocess

    from netquant.codegen.build import CompiledNetwork

    gen = generate(qgraph, folder, name="net", target="cuda", tensor_cores=tensor_cores)
    emu = folder / "net_emulated.cpp"
    emu.write_text(emulate((folder / "net.cu").read_text()))
    lib = folder / "libnet_emulated.so"
    subprocess.run(["g++", "-O2", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-o", str(lib), str(emu)],
                   check=True, cwd=folder, capture_output=True)
    return CompiledNetwork(lib, gen.program)


@pytest.mark.slow
def test_cuda_pools_concat_and_gathers_in_cpu_emulation(cifar, tmp_path):
    """The integer kernels ResNet-20 lacks (max pool, concat, channel shuffle gathers, a strided
    avg pool) on a torchvision-style ShuffleNetV2, lane by lane on the CPU: bit-exact."""
    import zoo

    q = Quantizer(zoo.make("shufflenetv2", 0))
    q.calibrate(calibration_set(cifar, 16))
    qg = q.quantize().qgraph
    assert {"maxpool", "avgpool", "concat", "gather"} <= {n.op for n in qg.nodes if n.quantized}
    net = _emulated(qg, tmp_path)
    x = to_float(cifar.test.images[:4])
    name = qg.int_output()
    assert np.array_equal(net.predict_int(x), run_int8(qg, torch.from_numpy(x), keep=[name])[name].numpy())


@pytest.mark.parametrize("tensor_cores", [False, True], ids=["dp4a", "mma"])
def test_report_counts_the_device_constants_once(qnet, tmp_path, tensor_cores):
    """The report's constant bytes are the tables the library holds: one weight layout per conv
    (the dp4a or tensor-core one), not the CPU layouts of the shared Program; the weights go to
    the binary weights file (uploaded once), not into the .cu as text."""
    gen = generate(qnet, tmp_path, name="resnet20", target="cuda", tensor_cores=tensor_cores)
    assert gen.sizes["resnet20.cu"] < 200_000, gen.sizes   # no weight literals: 82-136 KB (it was 1.3 MB)
    weights = sum(int(n.params["weight"].size) for n in qnet.qgraph.nodes
                  if n.op in ("conv", "linear") and n.quantized)
    per_channel = sum(12 * len(n.params["bias"]) for n in qnet.qgraph.nodes if n.op in ("conv", "linear") and n.quantized)
    assert weights <= gen.const_bytes <= 1.25 * weights + per_channel + 64 * 1024, (gen.const_bytes, weights)
    assert weights <= gen.sizes["resnet20_weights.bin"] <= gen.const_bytes
    tables = (tmp_path / "resnet20.cu").read_text().count("at byte ")   # the file's tables, 64-byte aligned
    assert 0 <= gen.const_bytes - sum(gen.layer_bytes.values()) < 64 * tables, (gen.const_bytes, tables)
