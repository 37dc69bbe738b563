"""The aarch64 build (Arm Cortex-A): the portable C library with NEON conv kernels, cross-built.

    gen = generate(qnet, "out", isa="neon", cross="aarch64-linux-gnu")
    net = load(gen)              # runs the test bench under qemu-aarch64 (natively on an Arm host)
    net.predict_int(images)

``--isa neon`` compiles with ``-march=armv8.2-a+dotprod``: convs over 8-bit input run on SDOT
(``netquant_neon.h``); ``--isa neon-v8`` (``-march=armv8-a``) on plain NEON (SMULL/SMLAL2/SADALP);
``--isa scalar`` is the portable C. Every other step is :class:`~netquant.codegen.c.CPrinter`'s
portable kernel: the same integers (netquant_rt.h). The cross build is a static executable (the
test bench ``main.c``), not a shared library: an aarch64 library cannot be loaded into an x86
Python; :class:`CrossNetwork` runs the bench on files instead, under ``qemu-aarch64`` where the
host is not aarch64 (OpenMP linked statically from the cross toolchain's libgomp).
"""
from __future__ import annotations

import html
import platform
import shutil
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import CompiledNetworkError
from ..fileio import write_text
from ..quant.config import CROSS_TRIPLES
from .c import CPrinter, Source
from .program import Step

NEON_RUNTIME = "netquant_neon.h"
# isa -> flags of the aarch64 build
ARM_ISA_FLAGS = {
    "neon": "-O3 -march=armv8.2-a+dotprod",   # SDOT/UDOT dot-product kernels (Cortex-A55/A76 and newer)
    "neon-v8": "-O3 -march=armv8-a",           # plain NEON kernels (Cortex-A53/A72)
    "scalar": "-O2 -fno-tree-vectorize -DNQ_NO_SIMD",
}
ARM_COMMON_FLAGS = "-std=c11 -fopenmp -ffp-contract=off -Wall -Wextra -Wno-unused-parameter"
ARM_FEATURES = {
    "neon": "Armv8.2-A dot product (SDOT) over NEON, 4 pixels x 4 output channels per tile",
    "neon-v8": "Armv8.0-A NEON (SMULL, SMLAL2, SADALP), 4 pixels x 4 output channels per tile",
    "scalar": "none: portable C",
}
DOT = 16   # bytes of one vector: the run of a filter row is padded to a multiple of this


def neon_eligible(s: Step, in_dtype: str) -> bool:
    """Convs netquant_neon.h serves: ungrouped, integer, over 8-bit input, taps adjacent along W."""
    return (s.kind == "conv" and s.node.quantized and s.node.attrs["groups"] == 1 and in_dtype in ("int8", "uint8")
            and s.node.attrs["dilation"][1] == 1)


def pack_rows(w: np.ndarray) -> np.ndarray:
    """Conv weights (O, I, KH, KW) -> int8 (O, KH, R): each filter row's KW*I channels-last bytes,
    zero padded to R = KW*I rounded up to 16. Example: I = 3, KW = 3: 9 bytes per row, R = 16."""
    o, i, kh, kw = w.shape
    r = -(-kw * i // DOT) * DOT
    out = np.zeros((o, kh, r), np.int8)
    out[:, :, :kw * i] = w.transpose(0, 2, 3, 1).reshape(o, kh, kw * i)
    return out


def unsigned_bias(bias: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The bias of the kernel over uint8 input read as x - 128: bias + 128 * sum(w) per output
    channel (the inverse of program.vnni_bias). Example: w = [3, -5], bias 10: 10 - 256 = -246."""
    return (bias.astype(np.int64) + 128 * w.reshape(len(w), -1).sum(1, dtype=np.int64)).astype(np.int32)


class NeonPrinter(CPrinter):
    """CPrinter's portable library with the NEON conv kernel of netquant_neon.h (under NQ_NEON)."""
    fuses_adds = False   # its conv kernels are its own (c.py fuse_adds: the x86 register tiles)

    def __init__(self, program, provenance: str = "", isa: str = "neon"):
        super().__init__(program, provenance, profile="scalar")
        self.isa = isa

    def neon(self, s: Step) -> bool:
        return neon_eligible(s, self.buf(s.inputs[0]).dtype) if s.kind == "conv" else False

    def neon_keys(self, s: Step) -> set:
        """The tables the NEON kernel of ``s`` reads: its weight rows and bias, mult, shift."""
        w = s.node.params["weight"]
        padded = w.shape[1] * w.shape[3] % DOT != 0
        unsigned = self.buf(s.inputs[0]).dtype == "uint8"
        return {"wn" if padded else "w", "biasn" if unsigned else "bias", "mult", "shift"}

    def step_consts(self, s: Step) -> dict:
        if not self.neon(s):
            return super().step_consts(s)
        extra = {}
        w = s.node.params["weight"]
        if "wn" in self.neon_keys(s):
            extra["wn"] = pack_rows(w)
        if "biasn" in self.neon_keys(s):
            extra["biasn"] = unsigned_bias(s.node.params["bias"], w)
        return {**super().step_consts(s), **extra}

    def const_guard(self, s: Step, key: str):
        if not self.neon(s):
            return super().const_guard(s, key)
        fast, portable = self.neon_keys(s), {"w", "bias", "mult", "shift"}
        if key in fast and key in portable:
            return ""
        return "NQ_NEON" if key in fast else "!NQ_NEON" if key in portable else None

    def pad_bytes(self, s: Step) -> int:
        c, h, w = self.hwc(self.buf(s.inputs[0]).shape)
        ph, pw = s.node.attrs["padding"]
        return (h + 2 * ph) * (w + 2 * pw) * c + w_row(s) + 16   # NQ_NEON_PAD_BYTES

    def simd_runtime(self) -> str:
        """The padded-input buffer and one const nq_neon_conv per NEON conv (after the weights
        file's symbol, which the constants name)."""
        text = super().simd_runtime()
        convs = [s for s in self.p.steps if self.neon(s)]
        if not convs:
            return text
        o = Source()
        o("#if NQ_NEON")
        o(f"static _Thread_local int8_t nq_neon_pad[{max(self.pad_bytes(s) for s in convs)}] "
          "__attribute__((aligned(16)));  /* the padded input (netquant_neon.h) */")
        for s in convs:
            a = s.node.attrs
            c, h, w = self.hwc(self.buf(s.inputs[0]).shape)
            oc, oh, ow = self.hwc(self.buf(s.output).shape)
            kh, kw = s.node.params["weight"].shape[2:]
            keys = self.neon_keys(s)
            wname = self.const_name(s, "wn" if "wn" in keys else "w")
            bname = self.const_name(s, "biasn" if "biasn" in keys else "bias")
            vals = [c, h, w, oc, oh, ow, kh, kw, *a["stride"], *a["padding"], a["dilation"][0], w_row(s),
                    int(self.buf(s.inputs[0]).dtype == "uint8"), *a["clamp"], wname, bname,
                    self.const_name(s, "mult"), self.const_name(s, "shift")]
            o(f"static const nq_neon_conv {self.const_name(s, 'neon')} = {{{', '.join(map(str, vals))}}};")
        o("#endif")
        return text + "\n" + o.text()

    def k_conv(self, s: Step, o: Source):
        if not self.neon(s):
            return super().k_conv(s, o)
        o("#if NQ_NEON")
        o(f"nq_conv_neon(&{self.const_name(s, 'neon')}, x0, y, nq_neon_pad);")
        o("#else")
        self.conv_loops(s, o)
        o("#endif")

    def kernel_label(self, s: Step) -> str:
        if self.neon(s):
            return ("conv: NEON SDOT (Armv8.2-A dot product) where built with it, else plain NEON "
                    "(SMULL/SADALP), else portable C")
        return super().kernel_label(s)

    def extra_includes(self) -> str:
        return (f"/* the NEON conv kernels on aarch64 (SDOT where the compiler targets the dot product\n"
                f" * extension), the portable ones elsewhere or with -DNQ_NO_SIMD */\n"
                f"#if defined(__aarch64__) && defined(__ARM_NEON) && !defined(NQ_NO_SIMD)\n#define NQ_NEON 1\n"
                f"#include \"{NEON_RUNTIME}\"\n#else\n#define NQ_NEON 0\n#define NQ_NEON_DOT 0\n#endif\n")

    def kernels_expr(self) -> str:
        return 'NQ_NEON ? (NQ_NEON_DOT ? "neon-dotprod" : "neon") : "portable"'

    def write(self, folder, cflags: str) -> dict:
        sizes = super().write(folder, cflags)
        text = resources.files("netquant.codegen").joinpath("runtime", NEON_RUNTIME).read_text()
        write_text(folder / NEON_RUNTIME, text)
        sizes[NEON_RUNTIME] = (text.count("\n"), len(text.encode()))
        return sizes

    def makefile(self, cflags: str) -> str:
        n = self.p.name
        return f"""# Generated by netquant: the aarch64 build of {n} ({self.isa}). make: the test bench {n}_bench
# (run it on the board, or here: qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu cortex-a76 ./{n}_bench IN OUT [--int]).
# On the board itself: make CC=gcc.
CC = aarch64-linux-gnu-gcc
CFLAGS = {cflags}
{n}_bench: main.c {n}.c {n}.h netquant_rt.h {NEON_RUNTIME} {n}_weights.bin
\t$(CC) $(CFLAGS) -static -o $@ main.c {n}.c -lm
clean:
\trm -f {n}_bench
"""


def board_notes(gen) -> str:
    """The report's section on an aarch64 build: the Arm features its kernels use and how to
    build and run it on a board."""
    n, flags = html.escape(gen.name), html.escape(gen.cflags)
    return (f"<h2>Arm build ({html.escape(gen.cross)}, --isa {html.escape(gen.profile)})</h2>\n"
            f"<p>Arm features of the conv kernels: {html.escape(ARM_FEATURES[gen.profile])}; every other layer "
            f"is portable C. <code>{n}_kernels()</code> says which conv kernels the binary runs: "
            f"\"neon-dotprod\", \"neon\" or \"portable\".</p>\n"
            f"<p>On the board (Linux, aarch64): copy this folder and run <code>make CC=gcc</code>, or compile "
            f"<code>{n}.c</code> (beside <code>{n}.h</code>, <code>netquant_rt.h</code>, <code>{NEON_RUNTIME}</code> "
            f"and <code>{n}_weights.bin</code>) into your program with <code>{flags}</code>. Here, "
            f"<code>make</code> cross-compiles the test bench <code>{n}_bench</code> and "
            f"<code>qemu-aarch64 -L {SYSROOT} -cpu {QEMU_CPUS.get(gen.profile, 'max')} ./{n}_bench IN OUT --int</code> "
            f"runs it.</p>\n")


def w_row(s: Step) -> int:
    """R of netquant_neon.h: the bytes of one filter row of the weights the kernel reads (KW*C,
    rounded up to 16)."""
    w = s.node.params["weight"]
    return -(-w.shape[1] * w.shape[3] // DOT) * DOT


def cross_compiler(triple: str) -> str:
    from .build import BuildError

    if triple not in CROSS_TRIPLES:
        raise ValueError(f"unknown --cross {triple!r}: one of {', '.join(CROSS_TRIPLES)}")
    if platform.machine() == "aarch64" and shutil.which("gcc"):
        return shutil.which("gcc")
    path = shutil.which(f"{triple}-gcc")
    if path is None:
        raise BuildError(f"{triple}-gcc not found: install it, e.g. 'apt-get install gcc-{triple}' (Debian/Ubuntu)")
    return path


def build_cross(gen, cc: Optional[str] = None) -> Path:
    """Compile the test bench with the cross compiler (linked against the target's glibc and
    libgomp: on the board its own, here the cross toolchain's under qemu-aarch64 -L); returns its path."""
    from .build import BuildError, write_report

    compiler = shutil.which(cc) if cc else cross_compiler(gen.cross)
    exe = gen.folder / f"{gen.name}_bench"
    cmd = [compiler, *gen.cflags.split(), "-o", exe.name, "main.c", f"{gen.name}.c", "-lm"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=gen.folder, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"cross-compiling {gen.name} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    gen.build = {"command": " ".join(cmd), "seconds": round(time.time() - t0, 2), "warnings": proc.stderr,
                 "library": str(exe), "cached": False}
    write_report(gen)
    return exe


SYSROOT = "/usr/aarch64-linux-gnu"   # Debian's libc6-arm64-cross (installed with gcc-aarch64-linux-gnu)


# the core QEMU emulates for each build: a real one with exactly the build's features, so an
# instruction the build must not use faults (SDOT on the Armv8.0 Cortex-A72), and no SVE for libc
# to pick (QEMU's default "max" has it: the same bench ran 15-25% slower, measured 2026-12-03)
QEMU_CPUS = {"neon": "cortex-a76", "neon-v8": "cortex-a72", "scalar": "cortex-a53"}


def runner(profile: Optional[str] = None) -> list:
    """How to run an aarch64 executable here: directly on an aarch64 host, else qemu-aarch64 with
    the cross toolchain's shared libraries, on the core of QEMU_CPUS for build ``profile``."""
    from .build import BuildError

    if platform.machine() == "aarch64":
        return []
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:
        raise BuildError("qemu-aarch64 not found: 'apt-get install qemu-user' runs the aarch64 build here")
    cpu = QEMU_CPUS.get(profile)
    return [qemu, "-L", SYSROOT] + (["-cpu", cpu] if cpu else [])


class CrossNetwork:
    """The aarch64 test bench as a network: images go to a file, the bench runs (under QEMU on a
    non-Arm host), the outputs come back. ``kernels``: what the bench reports it uses."""

    def __init__(self, exe: Path, program, timeout: float = 3600, profile: Optional[str] = None):
        self.exe, self.program, self.timeout, self.profile = Path(exe), program, timeout, profile
        self.input_shape = tuple(program.buffer(program.input).shape)

    def _run(self, images, as_int: bool) -> np.ndarray:
        x = np.ascontiguousarray(images, np.float32)
        if x.ndim != 4 or x.shape[1:] != self.input_shape:
            raise CompiledNetworkError(f"expected images of shape (N, {', '.join(map(str, self.input_shape))}), "
                                       f"got {x.shape}")
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
            src.write_bytes(np.int32(len(x)).tobytes() + x.tobytes())
            cmd = [*runner(self.profile), str(self.exe), str(src), str(dst)] + (["--int"] if as_int else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
            if proc.returncode != 0:
                raise CompiledNetworkError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
            out = np.frombuffer(dst.read_bytes(), np.int32 if as_int else np.float32)
        return out.reshape(len(x), -1).copy()

    def predict(self, images) -> np.ndarray:
        return self._run(images, False)

    __call__ = predict

    def predict_int(self, images) -> np.ndarray:
        return self._run(images, True)


def generate_neon(program, folder: Path, isa: str, provenance: str, cross: Optional[str]):
    """Print and write the aarch64 sources; returns (printer, cflags, sizes)."""
    flags = f"{ARM_ISA_FLAGS[isa]} {ARM_COMMON_FLAGS}"
    if not cross:   # a native Arm build of the library: shared, like the x86 one
        flags += " -fPIC"
    printer = NeonPrinter(program, provenance, isa)
    sizes = printer.write(folder, flags)
    return printer, flags, sizes

