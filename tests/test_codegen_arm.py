"""Arm targets: the aarch64 build (NEON: SDOT dot product, plain NEON, portable) cross-compiled and
run under qemu-aarch64, and the Cortex-M micro target cross-compiled with arm-none-eabi-gcc and
run on QEMU's mps2-an386 (Cortex-M4) / mps3-an547 (Cortex-M55) with semihosting, on real
CIFAR-10 test images. Tolerance: exact integers against the reference executor. Each test skips,
naming the tool, where its cross compiler or QEMU is absent (.ci/run installs them)."""
import html
import platform
import shutil
import subprocess

import numpy as np
import pytest
import torch

from netquant.codegen import CodegenError, generate, load
from netquant.codegen.arm_neon import ARM_FEATURES
from netquant.codegen.micro_board import build_micro, run_qemu
from netquant.codegen.program import c_name
from netquant.data import calibration_set
from netquant.data.transforms import to_float
from netquant.models.pretrained import load_pretrained
from netquant.quantizer import Quantizer
from netquant.ref.executor import run_int8

pytestmark = pytest.mark.compiler


def _need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed (.ci/run installs it)")


needs_aarch64 = _need("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-objdump", "qemu-aarch64")
needs_cortex_m = _need("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm")
CODE_ALLOWANCE = 64 * 1024   # flash beyond the int8 weights: code, bias and requantization tables
RAM_FACTOR = 1.2             # arena + stack against the largest pair of live activations


@pytest.fixture(scope="module")
def quantizer(cifar):
    q = Quantizer(load_pretrained())
    q.calibrate(calibration_set(cifar))
    return q


@pytest.fixture(scope="module")
def qnet(quantizer):
    return quantizer.quantize()


def _reference(qgraph, x, program):
    """The reference executor's quantized input (int8, NCHW) and integer output for images x."""
    qin = next((n.name for n in qgraph.nodes if c_name(n.name) == program.int_input), None)
    keep = [qgraph.int_output()] + ([qin] if qin else [])
    out = run_int8(qgraph, torch.from_numpy(x), keep=keep)
    ref = out[qgraph.int_output()].numpy().reshape(len(x), -1)
    return (out[qin].numpy().astype(np.int8) if qin else None), ref


# --- aarch64 (Cortex-A) ------------------------------------------------------------------------
def _neon_bit_exact(qgraph, x, folder, isa="neon"):
    gen = generate(qgraph, folder, name="net", isa=isa, cross="aarch64-linux-gnu")
    net = load(gen)
    assert gen.build["warnings"].strip() == "", gen.build["warnings"]
    _, ref = _reference(qgraph, x, gen.program)
    assert np.array_equal(net.predict_int(x), ref), isa
    return gen


@needs_aarch64
@pytest.mark.parametrize("isa, instruction", [("neon", "sdot"), pytest.param("neon-v8", "sadalp", marks=pytest.mark.slow),
                                              pytest.param("scalar", None, marks=pytest.mark.slow)])
def test_aarch64_builds_are_bit_exact(isa, instruction, qnet, cifar, tmp_path):
    """Each aarch64 build equals the reference on a few real images, and its binary holds the
    instructions it claims (SDOT for the dot-product build, SADALP for plain NEON, neither in the
    portable one)."""
    gen = _neon_bit_exact(qnet.qgraph, to_float(cifar.test.images[:6]), tmp_path, isa)
    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", gen.build["library"]], capture_output=True,
                         text=True, check=True).stdout
    mnemonics = {line.split("\t")[2].strip() for line in asm.splitlines() if line.count("\t") >= 2}
    for m in ("sdot", "sadalp"):
        assert (m in mnemonics) == (m == instruction), (isa, m)
    # the report says which Arm features the build uses and how to build it for a board
    report = html.unescape((gen.folder / "report.html").read_text())
    assert ARM_FEATURES[isa] in report and "make CC=gcc" in report


def test_arm_isa_needs_an_arm_host_or_cross(qnet, tmp_path):
    if platform.machine() == "aarch64":
        pytest.skip("this host is aarch64: --isa neon builds natively")
    with pytest.raises(ValueError, match="give cross='aarch64-linux-gnu'"):
        generate(qnet, tmp_path, isa="neon")


@needs_aarch64
@pytest.mark.slow
def test_aarch64_dotprod_build_on_1000_images(qnet, cifar, tmp_path):
    _neon_bit_exact(qnet.qgraph, to_float(cifar.test.images[:1000]), tmp_path)


@needs_aarch64
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet_a", "resnet_b", "vgg", "mobilenetv2", "shufflenetv2", "biasnet", "lenet"])
def test_aarch64_zoo_architectures(arch, cifar, tmp_path):
    import zoo

    q = Quantizer(zoo.make(arch), example=torch.rand(2, 3, 32, 32))
    q.calibrate(cifar.train.images[:32])
    _neon_bit_exact(q.quantize().qgraph, to_float(cifar.test.images[:4]), tmp_path)


@needs_aarch64
@pytest.mark.slow
@pytest.mark.parametrize("cls_name", ["OptionAResNet", "GroupedNet", "ShuffleNet", "PoolNet", "FlattenNet",
                                      "BiasNet", "InplaceNet"])
def test_aarch64_c_test_architectures(cls_name, cifar, tmp_path):
    import test_architectures as arch

    q = Quantizer(arch.build(getattr(arch, cls_name), cifar, images=200, epochs=1))
    q.calibrate(cifar.train.images[:32])
    _neon_bit_exact(q.quantize().qgraph, to_float(cifar.test.images[:4]), tmp_path)


# --- Cortex-M (micro) --------------------------------------------------------------------------
def _micro_run(qgraph, x, folder, cpu, extra="", icount=False):
    gen = generate(qgraph, folder, name="resnet20", target="micro", cpu=cpu)
    build_micro(gen, extra=extra)
    assert gen.build["warnings"].strip() == "", gen.build["warnings"]
    qin, ref = _reference(qgraph, x, gen.program)
    scores, stats = run_qemu(gen, qin, icount=icount)
    assert np.array_equal(scores.astype(np.int32), ref), cpu
    return gen, stats


def _check_memory(gen, stats):
    """Flash within the int8 weights + 64 KB, RAM (arena + painted stack) within 1.2x the largest
    pair of live activations, the arena in the ELF as planned, no heap, no libm."""
    mp, fl = gen.micro, gen.flash
    print(f"\n{gen.profile}: flash {fl['flash']:,} B (int8 weights {mp.int8_weight_bytes:,} + code and tables "
          f"{fl['flash'] - mp.int8_weight_bytes:,}); arena {mp.arena_bytes:,} B + stack {stats['stack']} B "
          f"= {mp.arena_bytes + stats['stack']:,} B; largest live pair {mp.largest_pair:,} B")
    assert fl["flash"] <= mp.int8_weight_bytes + CODE_ALLOWANCE
    assert fl["arena"] == mp.arena_bytes == stats["arena"]
    assert 0 < stats["stack"] and mp.arena_bytes + stats["stack"] <= RAM_FACTOR * mp.largest_pair
    assert not fl["malloc"] and "-lm" not in gen.build["command"]
    # the report gives the same numbers, per layer too
    report = (gen.folder / "report.html").read_text()
    assert f"arena of {mp.arena_bytes:,} bytes" in report and f"flash {fl['flash']:,}" in report
    layer = next(iter(fl["layers"].values()))
    assert layer["code"] > 0 and layer["const"] > 0


@needs_cortex_m
def test_cortex_m4_bit_exact_on_20_images_within_flash_and_ram(qnet, cifar, tmp_path):
    """The shipped ResNet-20 on mps2-an386: SMLAD kernels, 20 real test images, bit-exact."""
    gen, stats = _micro_run(qnet.qgraph, to_float(cifar.test.images[:20]), tmp_path, "cortex-m4")
    assert gen.flash["shared_code"] > 0
    asm = subprocess.run(["arm-none-eabi-objdump", "-d", str(gen.folder / "resnet20.elf")], capture_output=True,
                         text=True, check=True).stdout
    assert "smlad" in asm and "sxtb16" in asm
    assert len(gen.micro.fused) == 9   # every residual add of ResNet-20 written over its skip
    _check_memory(gen, stats)


@needs_cortex_m
@pytest.mark.slow
def test_cortex_m4_portable_fallback_is_bit_exact_and_slower(qnet, cifar, tmp_path):
    """-DNQ_NO_SIMD: the portable kernels, bit-exact, and (instructions counted by QEMU's
    -icount clock) executing at least twice the instructions of the SMLAD build per image."""
    x = to_float(cifar.test.images[:2])
    gen, portable = _micro_run(qnet.qgraph, x, tmp_path / "p", "cortex-m4", "-DNQ_NO_SIMD", icount=True)
    asm = subprocess.run(["arm-none-eabi-objdump", "-d", str(gen.folder / "resnet20.elf")], capture_output=True,
                         text=True, check=True).stdout
    assert "smlad" not in asm
    _, dsp = _micro_run(qnet.qgraph, x, tmp_path / "d", "cortex-m4", icount=True)
    print(f"\ninstructions per image: portable {portable['instructions'] // 2:,}, SMLAD {dsp['instructions'] // 2:,}")
    assert portable["instructions"] >= 2 * dsp["instructions"] > 0


@needs_cortex_m
@pytest.mark.slow
def test_cortex_m55_mve_is_bit_exact(qnet, cifar, tmp_path):
    """mps3-an547: the MVE (Helium) kernels, a few real images."""
    gen, stats = _micro_run(qnet.qgraph, to_float(cifar.test.images[:3]), tmp_path, "cortex-m55")
    asm = subprocess.run(["arm-none-eabi-objdump", "-d", "-marmv8.1-m.main", str(gen.folder / "resnet20.elf")],
                         capture_output=True, text=True, check=True).stdout
    assert "vmlava.s16" in asm   # objdump prints VMLADAVA as its alias VMLAVA
    _check_memory(gen, stats)


@needs_cortex_m
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet_b", "mobilenetv2", "shufflenetv2"])
def test_cortex_m4_zoo_architectures(arch, cifar, tmp_path):
    """The micro target on zoo nets that reach its other paths: option-B shortcuts whose add takes
    the conv as its second operand, depthwise convs on the portable kernel, concat and gathers."""
    import zoo

    q = Quantizer(zoo.make(arch), example=torch.rand(2, 3, 32, 32))
    q.calibrate(cifar.train.images[:32])
    gen, stats = _micro_run(q.quantize().qgraph, to_float(cifar.test.images[:2]), tmp_path, "cortex-m4")
    assert gen.micro.arena_bytes + stats["stack"] <= RAM_FACTOR * gen.micro.largest_pair


class SelfResidual(torch.nn.Module):
    """y = relu(x + conv(x)): the add's skip is the conv's own input."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.c0(x))
        return self.fc(torch.relu(x + self.c1(x)).mean([2, 3]))


@needs_cortex_m
def test_cortex_m4_add_over_the_convs_own_input_is_not_fused(cifar, tmp_path):
    """Writing the add over its skip would overwrite pixels the conv still reads when the skip is
    the conv's input: that add stays a step of its own, and the result is bit-exact."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SelfResidual().eval()
    q = Quantizer(model, example=torch.rand(2, 3, 32, 32))
    q.calibrate(cifar.train.images[:16])
    gen, _ = _micro_run(q.quantize().qgraph, to_float(cifar.test.images[:2]), tmp_path, "cortex-m4")
    assert gen.micro.fused == {} and any(s.kind == "add" for s in gen.program.steps)


def test_micro_refuses_float_layers(cifar, tmp_path):
    """A network with a float layer inside (a sigmoid table) is refused, naming the layer."""
    import zoo

    q = Quantizer(zoo.make("se_hardswish"), example=torch.rand(2, 3, 32, 32))
    q.calibrate(cifar.train.images[:8])
    with pytest.raises(CodegenError, match=r"micro target: layer \S+ \(\w+\) runs in float"):
        generate(q.quantize(), tmp_path, target="micro", cpu="cortex-m4")


def test_micro_unknown_cpu(qnet, tmp_path):
    with pytest.raises(ValueError, match="unknown --cpu 'cortex-m99'"):
        generate(qnet, tmp_path, target="micro", cpu="cortex-m99")


@needs_aarch64
@needs_cortex_m
@pytest.mark.slow
def test_cli_codegen_micro_and_cross(quantizer, tmp_path, capsys):
    """netquant codegen --target micro --cpu cortex-m4 and --cross aarch64-linux-gnu: sources,
    the cross-built binaries and the reports, from a saved quantizer."""
    from netquant.cli import main

    nq = tmp_path / "r20.nq"
    quantizer.save(nq)
    assert main(["codegen", "--quantizer", str(nq), "--target", "micro", "--cpu", "cortex-m4", "--out",
                 str(tmp_path / "m4"), "--name", "r20"]) == 0
    out = capsys.readouterr().out
    assert "cortex-m4: flash " in out and "arena 33,920 bytes" in out and (tmp_path / "m4" / "r20.elf").exists()
    assert main(["codegen", "--quantizer", str(nq), "--cross", "aarch64-linux-gnu", "--isa", "neon", "--out",
                 str(tmp_path / "a64"), "--name", "r20"]) == 0
    out = capsys.readouterr().out
    assert "aarch64-linux-gnu-gcc -O3 -march=armv8.2-a+dotprod" in out and (tmp_path / "a64" / "r20_bench").exists()
