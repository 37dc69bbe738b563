"""CUDA code generation: the generated .cu builds with nvcc for sm_75, sm_80 and sm_90 with no
error and no warning (compile-only here: these machines have nvcc and no GPU). With a GPU the
library must equal the integer reference executor bit for bit (bench/gpu_check.py does the full
test set and the speed)."""
import ctypes
import re
import shutil

import numpy as np
import pytest
import torch
from netquant.codegen.cuda_emulation import build_emulated

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
    cu = generate(qnet, tmp_path / "cu", name="net", target="cuda", tensor_cores=False)   # (tensor cores: adds fused)
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


@pytest.mark.parametrize("tensor_cores", [False, True], ids=["dp4a", "mma"])
def test_cuda_kernels_compute_the_reference_integers_in_cpu_emulation(qnet, cifar, tmp_path, tensor_cores):
    """Without a GPU: the generated kernels and host runtime, run thread by thread on the CPU
    (tests the indexing, memory plan, dp4a packing, the tensor-core kernels' cp.async stages,
    gathered int8 stem, barriers, ldmatrix and mma fragments, requantization and fused residual
    adds (tiles of 16, 32 and 64 channels, 1 to 18 k tiles; 3 images: row tiles that span
    images and a partial last one); the GPU check confirms it on the hardware)."""
    net = _emulated(qnet.qgraph, tmp_path, tensor_cores)
    src = (tmp_path / "net.cu").read_text()
    assert ("nq_mma_u8s8(acc" in src) == tensor_cores
    if tensor_cores:   # every tile width, and both epilogues
        assert {f"BN = {b}," for b in (16, 32, 64)} <= set(re.findall(r"BN = \d+,", src))
        assert "KT = 1," in src and "residual add" in src and "uint4 v = " in src
        assert src.count("gathered byte by byte") == 1   # the RGB stem (int8, 3 channels)
    x = to_float(cifar.test.images[:3])   # emulated thread by thread: about 0.4 s per image and call
    name = qnet.qgraph.int_output()
    ref = run_int8(qnet.qgraph, torch.from_numpy(x), keep=[name])[name].numpy()
    assert np.array_equal(net.predict_int(x), ref)
    assert np.abs(net.predict(x) - qnet.run(x)).max() < 1e-6
    qin = run_int8(qnet.qgraph, torch.from_numpy(x), keep=["input_quantize"])["input_quantize"].numpy()
    assert np.array_equal(net.predict_int8(qin.astype(np.int8)), net.predict(x))
    # the forward pass is a CUDA graph per entry kind, captured again when n or a buffer changes (a
    # graph replayed with stale arguments computes the last call's images): other batch sizes,
    # and the device entry point into two output buffers in turn
    assert np.array_equal(net.predict_int(x[1:2]), ref[1:2]) and np.array_equal(net.predict_int(x), ref)
    scores = net.predict(x)
    device = net.lib.net_predict_device
    fp = ctypes.POINTER(ctypes.c_float)
    device.argtypes, device.restype = [fp, ctypes.c_size_t, ctypes.c_int, fp, ctypes.c_size_t], ctypes.c_int
    outs = [np.zeros((len(x), 10), np.float32) for _ in range(3)]
    for o in outs[:2] + outs[:1]:
        o[:] = 0
        assert device(x.ctypes.data_as(fp), x.size, len(x), o.ctypes.data_as(fp), o.size) == 0
    assert np.array_equal(outs[0], scores) and np.array_equal(outs[1], scores)
    assert net.lib.nq_emulated_graphs() == 2   # one executable graph per entry kind, the others destroyed
    # a CUDA call that fails (cudaMalloc of 2^31 - 1 arenas): NQ_ERR_RUNTIME, and the message is
    # that call's own code (the emulated cudaGetLastError always reports success)
    dummy = np.zeros(1, np.float32).ctypes.data_as(fp)
    n = 2 ** 31 - 1
    assert device(dummy, n * 3072, n, dummy, n * 10) == 3
    assert net.error_string(3) == "out of memory"
    assert np.array_equal(net.predict_int(x), ref)   # and the next call allocates again and runs


class _Wide(torch.nn.Module):
    """Tensor-core convs with several column tiles and many k tiles: 24 -> 256 channels (K = 216:
    4 k tiles, 4 column tiles of 64; uint8 input of 24 channels, gathered) and 256 -> 128
    strided (K = 2304: 36 k tiles, 2 column tiles, copied with cp.async), after an RGB conv to
    24 channels (3 column tiles of 8) and before a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 24, 3, padding=1)
        self.wide = torch.nn.Conv2d(24, 256, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(256)
        self.down = torch.nn.Conv2d(256, 128, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(128, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.wide(torch.relu(self.stem(x[:, :, :12, :12])))))
        return self.fc(torch.relu(self.down(x)).mean((2, 3)))


@pytest.mark.slow   # the emulation and an nvcc build for two architectures: ~1 min
def test_wide_tensor_core_convs_in_column_tiles(cifar, tmp_path):
    """Convs of 128 and 256 output channels run as blocks over column tiles with a pipelined loop
    over many k tiles (mma_tiles): the same integers as the reference in the emulation, and the
    nvcc build for sm_80 and sm_90 spills no register."""
    torch.manual_seed(0)
    q = Quantizer(_Wide().eval(), example=torch.zeros(1, 3, 32, 32))
    q.calibrate(to_float(cifar.train.images[:32]))
    qn = q.quantize()
    net = _emulated(qn.qgraph, tmp_path, tensor_cores=True)
    src = (tmp_path / "net.cu").read_text()
    assert src.count("BN = 64,") == 2 and "KT = 36," in src and "O = 256," in src
    # both gathered (uint8: 3 and 24 channels); the stem's 24 channels as 3 tiles of 8 (ldmatrix.x2, 8-byte stores)
    assert src.count("gathered byte by byte (a piece spans taps); the padding 0") == 2
    assert "BN = 8," in src and "nq_ldmatrix_x2(b" in src and "uint2 v = " in src
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


@pytest.mark.parametrize("mutation", [
    ("__syncthreads();                 /* ... every", "/* no barrier */                 /* ... every"),
    ("nq_cp_async_wait<STAGES - 2>();", "nq_cp_async_wait<STAGES - 1>();  /* one tile too early */"),
], ids=["no-barrier", "early-read"])
def test_the_emulation_fails_a_kernel_that_reads_shared_memory_too_early(qnet, cifar, tmp_path, mutation):
    """The emulation is strict where a GPU would be racy: copies land at their wait, and each warp
    runs ahead of the others to its next barrier, so the tensor-core kernel without the barrier
    after its cp.async wait, or waiting for one group too few, computes wrong integers (the
    bit-exact tests above are only as good as this)."""
    gen = generate(qnet, tmp_path, name="net", target="cuda", tensor_cores=True)
    src = (tmp_path / "net.cu").read_text()
    assert src.count(mutation[0]) >= 20
    (tmp_path / "net.cu").write_text(src.replace(*mutation))
    x = to_float(cifar.test.images[:1])
    name = qnet.qgraph.int_output()
    ref = run_int8(qnet.qgraph, torch.from_numpy(x), keep=[name])[name].numpy()
    assert not np.array_equal(build_emulated(gen, "-O1").predict_int(x), ref)


def _emulated(qgraph, folder, tensor_cores=False):
    """The CUDA library of ``qgraph`` built for the CPU emulation (netquant.codegen.cuda_emulation) and loaded."""
    return build_emulated(generate(qgraph, folder, name="net", target="cuda", tensor_cores=tensor_cores))


@pytest.mark.parametrize("name", ["shufflenetv2", "mobilenetv2", "upsample", "se_hardswish"])   # 3-4 s each
def test_other_networks_on_tensor_cores_in_cpu_emulation(cifar, tmp_path, name):
    """Networks nobody tuned the kernels for (tests/zoo.py), CUDA for sm_90 as generated by
    default: bit-exact lane by lane on the CPU. Between them: max and strided avg pools, concat
    and channel-shuffle gathers (ShuffleNetV2), depthwise convs (one thread per output) and
    24-channel layers (tiles of 8 channels) (MobileNetV2), float layers between integer ones (an upsampling FPN,
    hard-swish and squeeze-excitation)."""
    import zoo

    q = Quantizer(zoo.make(name, 0))
    q.calibrate(calibration_set(cifar, 16))
    qg = q.quantize().qgraph
    if name == "shufflenetv2":
        assert {"maxpool", "avgpool", "concat", "gather"} <= {n.op for n in qg.nodes if n.quantized}
    net = _emulated(qg, tmp_path, tensor_cores=None)
    src = (tmp_path / "net.cu").read_text()
    assert src.count("nq_mma_u8s8(acc") >= 3
    if name == "mobilenetv2":   # 24-channel layers: tiles of 8 columns (ldmatrix.x2), a fused add on 8-byte pieces
        assert "nq_ldmatrix_x2(b" in src and "const uint2 sk" in src
    x = to_float(cifar.test.images[:2])
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
