"""Generate, build and load: the MEX-file step of MATLAB's workflow, in the open.

    gen = generate(qnet, "out/c", name="resnet20")          # sources + report.html
    lib = build(gen)                                          # shared library (cached by hash)
    predict = load(gen, lib)                                  # scores = predict(images)

The build runs the system C compiler; the cache key is the hash of the sources and the exact
compiler command, so an unchanged network is not rebuilt.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import CompiledNetworkError, NetquantError
from ..fileio import write_bytes, write_text
from ..progress import Progress, report
from ..quant.config import CODEGEN_TARGETS, ISA_FLAGS
from .c import CPrinter
from .program import Program, plan

log = logging.getLogger(__name__)

COMMON_FLAGS = "-std=c11 -fPIC -fopenmp -ffp-contract=off -Wall -Wextra -Wno-unused-parameter"


class BuildError(NetquantError, RuntimeError):
    """The compiler is missing or failed; the message says what to install or what went wrong."""


@dataclass
class Generated:
    """Sources written for one network and target."""

    folder: Path
    program: Program
    target: str
    files: dict            # file name -> line count
    cflags: str
    build: dict = field(default_factory=dict)   # filled by build(): command, seconds, warnings, library
    kernels: dict = field(default_factory=dict)  # layer -> the kernel printed for it
    sizes: dict = field(default_factory=dict)    # file name -> bytes written
    profile: str = ""                            # the instruction set the kernels were printed for
    const_bytes: int = 0                         # bytes of the constants the source holds (compiled)
    seconds: float = 0.0                         # time to plan, print and write
    layer_bytes: dict = field(default_factory=dict)  # layer -> bytes of the constants compiled for it
    cross: Optional[str] = None                  # the cross target triple (arm_neon.py), None: this machine
    micro: Optional[object] = None               # the micro target's MicroPlan (micro.py)
    flash: dict = field(default_factory=dict)    # the micro target's ELF sizes, once built (micro.elf_sizes)

    @property
    def name(self) -> str:
        return self.program.name


CUDA_FLAGS = "-O3 --fmad=false -Xcompiler -fPIC -std=c++17 -Werror all-warnings"

# the kernels printed for each isa (c.PROFILES); "native" asks the compiler what -march=native targets
ISA_PROFILE = {"avx512": "vnni", "avx2": "avx2", "scalar": "scalar"}


def native_profile(cc: Optional[str] = None) -> str:
    """The best kernels for this machine as the compiler sees it with -march=native: "amx"
    (__AMX_INT8__ and AVX-512 VNNI), "vnni", "avx2" or "scalar"; from /proc/cpuinfo's flags
    where no compiler is found. Example: a Sapphire Rapids Xeon with gcc 12 gives "amx"."""
    try:
        compiler = find_compiler(cc)
        out = subprocess.run([compiler, "-march=native", "-dM", "-E", "-x", "c", os.devnull], capture_output=True,
                             text=True, timeout=60).stdout
        macros = {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}
        has = {"amx": {"__AMX_INT8__", "__AMX_TILE__"} <= macros, "vnni": {"__AVX512VNNI__", "__AVX512BW__"} <= macros,
               "avx2": "__AVX2__" in macros}
    except (BuildError, OSError, subprocess.SubprocessError):
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((set(line.split(":")[1].split()) for line in f if line.startswith("flags")), set())
        except OSError:
            flags = set()
        has = {"amx": "amx_int8" in flags, "vnni": {"avx512_vnni", "avx512bw"} <= flags, "avx2": "avx2" in flags}
    if has["vnni"]:
        return "amx" if has["amx"] else "vnni"
    return "avx2" if has["avx2"] else "scalar"


def generate(qnet, out: str | os.PathLike, name: str = "net", target: str = "c", isa: str = "native",
             provenance: str = "", progress: Optional[Progress] = None, arch: str = "sm_90",
             tensor_cores: Optional[bool] = None, cross: Optional[str] = None, cpu: str = "cortex-m4",
             fuse_adds: bool = True) -> Generated:
    """Write the sources of ``qnet`` (a QuantizedNetwork or QGraph) for ``target`` ("c", or
    "cuda" for GPU ``arch`` ("sm_90", or "sm_80,sm_90" for one library with the code of each);
    ``tensor_cores``: int8 tensor-core convolutions, sm_80 and newer (None: wherever ``arch`` has
    them, dp4a kernels otherwise); "micro"
    for an Arm Cortex-M ``cpu``, micro.py) into ``out``. ``cross`` ("aarch64-linux-gnu"): the Arm
    Cortex-A build, isa "neon" (dot product), "neon-v8" or "scalar" (arm_neon.py). ``fuse_adds``
    (x86 C, CUDA tensor cores): residual adds in the epilogue of the conv before them (c.py fuse_adds; the same
    integers either way)."""
    from .arm_neon import ARM_ISA_FLAGS

    if target not in CODEGEN_TARGETS:
        raise ValueError(f"unknown code generation target {target!r}: one of {', '.join(CODEGEN_TARGETS)}")
    arm = cross is not None or isa in ("neon", "neon-v8")
    if target == "c" and isa not in (ARM_ISA_FLAGS if arm else ISA_FLAGS) and not (arm and isa == "native"):
        raise ValueError(f"unknown isa {isa!r}; choose from {', '.join(ARM_ISA_FLAGS if arm else ISA_FLAGS)}")
    if arm and target == "c" and cross is None and platform.machine() != "aarch64":
        raise ValueError(f"isa {isa!r} builds for Arm: give cross='aarch64-linux-gnu' (--cross) on this "
                         f"{platform.machine()} machine")
    qgraph = getattr(qnet, "qgraph", qnet)
    if target == "micro":
        from .micro import generate_micro

        return generate_micro(qgraph, Path(out), name, cpu, provenance)
    t0 = time.time()
    report(progress, 0, 3, "planning")
    program = plan(qgraph, name)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    report(progress, 1, 3, "printing")
    if target == "cuda":
        from .cuda import CudaPrinter, arch_flags
        from .int4 import refuse_cuda

        refuse_cuda(program)   # no 4-bit weight route on the GPU: a clear error, never wrong code

        printer = CudaPrinter(program, provenance or "netquant integer network", arch=arch, tensor_cores=tensor_cores,
                              fuse_adds=fuse_adds)
        cflags = f"{CUDA_FLAGS} {arch_flags(arch)}"
        files = printer.files(cflags)
        for fname, text in files.items():   # atomically: an interrupted generate leaves no half file
            write_text(folder / fname, text)
        sizes = {k: (v.count("\n"), len(v.encode())) for k, v in files.items()}
        write_bytes(folder / printer.blob_file(), bytes(printer.blob))   # the weights, as the C target's
        sizes[printer.blob_file()] = (0, len(printer.blob))
        profile = "cuda"
    elif arm:
        from .arm_neon import generate_neon

        profile = "neon" if isa == "native" else isa
        printer, cflags, sizes = generate_neon(program, folder, profile, provenance or "netquant integer network", cross)
    else:
        # only the instruction set being built is printed (with the portable kernels as its fallback)
        profile = ISA_PROFILE.get(isa) or native_profile()
        printer = CPrinter(program, provenance or "netquant integer network", profile=profile, fuse_adds=fuse_adds)
        cflags = f"{ISA_FLAGS[isa]} {COMMON_FLAGS}"
        sizes = printer.write(folder, cflags)
    # the constants compiled for this target and instruction set (one weight layout per conv)
    const_bytes = printer.compiled_const_bytes()
    layer_bytes = {s.node.name: printer.step_const_bytes(s) for s in printer.p.steps}   # the steps as printed
    gen = Generated(folder, program, target, {k: v[0] for k, v in sizes.items()}, cflags,
                    kernels=printer.kernel_labels(),
                    sizes={k: v[1] for k, v in sizes.items()}, profile=profile, const_bytes=const_bytes,
                    seconds=round(time.time() - t0, 2), layer_bytes=layer_bytes, cross=cross)
    log.info("generated %s for %s in %.1f s: %s bytes of source and constants", name, profile, gen.seconds,
             f"{sum(gen.sizes.values()):,}")
    report(progress, 2, 3, "writing the report")
    write_report(gen)
    report(progress, 3, 3, "done")
    return gen


def find_compiler(cc: Optional[str] = None) -> str:
    """The C compiler: ``cc`` or $CC when given (and then only that one), else cc, gcc or clang."""
    explicit = cc or os.environ.get("CC")
    candidates = [explicit] if explicit else ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise BuildError(f"no C compiler found (looked for {', '.join(map(repr, candidates))}): install one, e.g. "
                     f"'apt-get install gcc' (Debian/Ubuntu) or 'xcode-select --install' (macOS), or set CC")


def build(gen: Generated, cache_dir: Optional[str | os.PathLike] = None, cc: Optional[str] = None,
          progress: Optional[Progress] = None) -> Path:
    """Compile the generated library (reusing a cached build with the same sources and command).
    Returns the path of the shared library (a cross build: its static test bench; micro: the ELF)."""
    if gen.cross:
        from .arm_neon import build_cross

        return build_cross(gen, cc)
    if gen.target == "micro":
        from .micro_board import build_micro

        return build_micro(gen, cc)
    if gen.target == "cuda":
        compiler = shutil.which(cc or "nvcc")
        if compiler is None:
            raise BuildError("nvcc not found: install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads) "
                             "or put nvcc on PATH")
        src = gen.folder / f"{gen.name}.cu"
    else:
        compiler = find_compiler(cc)
        src = gen.folder / f"{gen.name}.c"
    lib_name = f"lib{gen.name}.so"
    # CUDA: ptxas reports each kernel's registers and spills (the report's table; tests assert none spill)
    cmd = ([compiler, *gen.cflags.split(), "-shared", "-o", lib_name, src.name] + (["-lm"] if gen.target == "c" else [])
           + (["-Xptxas", "-v"] if gen.target == "cuda" else []))
    h = hashlib.sha256(" ".join(cmd[1:]).encode())
    for fname in sorted(gen.files):
        h.update(fname.encode())
        h.update((gen.folder / fname).read_bytes())
    key = h.hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else gen.folder / ".build"
    target = cache / key / lib_name
    report(progress, 0, 1, "compiling")
    resources = target.parent / "device_kernels.json"   # ptxas's per-kernel resources, kept with a cached build
    if target.exists():
        gen.build = {"command": " ".join(cmd), "seconds": 0.0, "warnings": "", "library": str(target), "cached": True}
        if resources.exists():
            gen.build["device_kernels"] = json.loads(resources.read_text())
        report(progress, 1, 1, "cached")
        return target
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=gen.folder, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"compiling {src} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(gen.folder / lib_name, target)
    warnings = proc.stderr
    gen.build = {"command": " ".join(cmd), "seconds": round(time.time() - t0, 2), "library": str(target), "cached": False}
    if gen.target == "cuda":
        from .cuda import ptxas_resources

        gen.build["device_kernels"], warnings = ptxas_resources(proc.stderr)
        write_text(resources, json.dumps(gen.build["device_kernels"]))
    gen.build["warnings"] = warnings
    write_report(gen)
    report(progress, 1, 1, "compiled")
    return target


class CompiledNetwork:
    """A built library, callable from Python: ``scores = net(images)``."""

    def __init__(self, library: str | os.PathLike, program: Program):
        self.program = program
        self.lib = ctypes.CDLL(str(library))
        n = program.name
        f = ctypes.POINTER(ctypes.c_float)
        size, count = ctypes.c_size_t, ctypes.c_int
        # (input, input length, n, output, output length): lengths in elements, checked by the C
        self._predict = getattr(self.lib, f"{n}_predict")
        self._predict.argtypes, self._predict.restype = [f, size, count, f, size], ctypes.c_int
        self._predict_int8 = getattr(self.lib, f"{n}_predict_int8")
        self._predict_int8.argtypes = [ctypes.POINTER(ctypes.c_int8), size, count, f, size]
        self._predict_int8.restype = ctypes.c_int
        self._predict_int = getattr(self.lib, f"{n}_predict_int")
        self._predict_int.argtypes = [f, size, count, ctypes.POINTER(ctypes.c_int32), size]
        self._predict_int.restype = ctypes.c_int
        self._threads = getattr(self.lib, f"{n}_set_num_threads")
        self._threads.argtypes, self._threads.restype = [ctypes.c_int], ctypes.c_int
        self._error = getattr(self.lib, f"{n}_error_string")
        self._error.argtypes, self._error.restype = [ctypes.c_int], ctypes.c_char_p
        kernels = getattr(self.lib, f"{n}_kernels")
        kernels.argtypes, kernels.restype = [], ctypes.c_char_p
        self.kernels = kernels().decode()  # "amx", "avx512-vnni", "portable", "cuda-mma" or "cuda-dp4a"
        self.input_shape = tuple(program.buffer(program.input).shape)

    def set_num_threads(self, threads: int) -> int:
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
            raise CompiledNetworkError(f"set_num_threads: expected a thread count >= 0 (0: all cores), got {threads!r}")
        return self._threads(int(threads))

    # The C entry points read n * prod(input_shape) elements and write n * classes: every array is
    # checked here (type, rank, shape, dtype, count) and made C-contiguous, so no shape, dtype or
    # stride can make the C read or write out of bounds. E.g. input (3, 32, 32): (20000, 1) int8 is
    # refused instead of letting the C read 20000 * 3072 bytes from a 20000-byte buffer.
    _MAX_BATCH = 2 ** 31 - 1   # the C count is an int

    def _array(self, images, what: str) -> np.ndarray:
        if images is None:
            raise CompiledNetworkError(f"{what}: expected an array of images, got None")
        if hasattr(images, "detach") and hasattr(images, "numpy"):   # a torch tensor
            images = images.detach().cpu().numpy()
        x = np.asarray(images)
        shape = ", ".join(map(str, self.input_shape))
        if x.dtype == object or x.ndim != 4 or x.shape[1:] != self.input_shape:
            raise CompiledNetworkError(f"{what}: expected images of shape (N, {shape}), got {x.shape} {x.dtype}")
        if len(x) > self._MAX_BATCH:
            raise CompiledNetworkError(f"{what}: {len(x)} images in one call, at most {self._MAX_BATCH}")
        return x

    def _images(self, images, what: str = "predict") -> np.ndarray:
        """Float32 C-contiguous (N, C, H, W) images in [0, 1] from uint8 or float images."""
        x = self._array(images, what)
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / np.float32(255)
        elif x.dtype.kind != "f":
            raise CompiledNetworkError(f"{what}: expected uint8 images (0..255) or float images in [0, 1], got "
                                       f"dtype {x.dtype} (convert them: uint8 for 0..255 pixels, x / 255 for floats)")
        # NaN and inf are refused by the C entry point itself (NQ_ERR_NONFINITE, before any work;
        # _check names it): a second scan here cost ~40 us a 224x224 image, 2% of MobileNetV2's
        return np.ascontiguousarray(x, dtype=np.float32)

    NQ_ERR_NONFINITE = 2   # netquant_rt.h

    def _check(self, rc: int, what: str = "predict") -> None:
        if rc == self.NQ_ERR_NONFINITE:
            raise CompiledNetworkError(f"{what}: images hold NaN or inf values")
        if rc != 0:
            raise RuntimeError(f"{self.program.name}_predict failed: {self._error(rc).decode()} (code {rc})")

    def _live(self):
        if self.lib is None:
            raise CompiledNetworkError(f"{self.program.name}: the library was closed (CompiledNetwork.close)")

    def predict(self, images) -> np.ndarray:
        """Scores (N, classes) for float images in [0, 1] (or uint8), NCHW."""
        self._live()
        x = self._images(images, "predict")
        out = np.empty((len(x), self.program.classes), np.float32)
        self._check(self._predict(x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), x.size, len(x),
                                  out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size))
        return out

    __call__ = predict

    def predict_int(self, images) -> np.ndarray:
        """The integer output tensor (before dequantization), for bit-exact comparison."""
        self._live()
        x = self._images(images, "predict_int")
        size = self.program.buffer(self.program.int_output).elements
        out = np.empty((len(x), size), np.int32)
        self._check(self._predict_int(x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), x.size, len(x),
                                      out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), out.size), "predict_int")
        return out

    def predict_int8(self, qimages) -> np.ndarray:
        """Scores from already quantized input (N, C, H, W) int8 (no other dtype: a float array
        would be truncated to garbage integers, so it is refused)."""
        self._live()
        q = self._array(qimages, "predict_int8")
        if q.dtype != np.int8:
            raise CompiledNetworkError(f"predict_int8: expected int8 images (already quantized with the input's "
                                       f"scale and zero point), got dtype {q.dtype}; use predict for images")
        q = np.ascontiguousarray(q)
        out = np.empty((len(q), self.program.classes), np.float32)
        self._check(self._predict_int8(q.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)), q.size, len(q),
                                       out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size))
        return out

    def close(self) -> None:
        """Unload the library (dlclose); the network cannot be called afterwards. Building and
        loading many networks in one process without closing them keeps every library mapped."""
        lib, self.lib = self.lib, None
        self._predict = self._predict_int = self._predict_int8 = self._threads = self._error = None
        if lib is not None:
            import _ctypes

            dlclose = getattr(_ctypes, "dlclose", None)   # POSIX; Windows has FreeLibrary
            if dlclose is not None:
                dlclose(lib._handle)

    def __enter__(self) -> "CompiledNetwork":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def raw_call(self, images_ptr, images_len: int, n: int, scores_ptr, scores_len: int,
                 entry: str = "predict") -> int:
        """A C entry point itself, unchecked (for tests of its own argument checks): ``entry`` is
        "predict", "predict_int8" or "predict_int"; lengths in elements, e.g. n=2 CIFAR images
        need images_len >= 2 * 3072 = 6144 and scores_len >= 2 * 10 = 20, else the C returns 5
        (NQ_ERR_BUFFER) without reading or writing either buffer."""
        self._live()
        fns = {"predict": self._predict, "predict_int8": self._predict_int8, "predict_int": self._predict_int}
        if entry not in fns:
            raise CompiledNetworkError(f"raw_call: entry must be one of {sorted(fns)}, got {entry!r}")
        return fns[entry](images_ptr, images_len, n, scores_ptr, scores_len)

    def error_string(self, code: int) -> str:
        """The library's message for a return code, e.g. 5: "a buffer is shorter than n images or n outputs"."""
        self._live()
        return self._error(int(code)).decode()


def load(gen: Generated, library: Optional[str | os.PathLike] = None, **build_args) -> CompiledNetwork:
    """Build if needed and return the callable network (a cross build: its test bench run under
    qemu-user, or natively on a host of that architecture)."""
    if gen.cross:
        from .arm_neon import CrossNetwork

        return CrossNetwork(library or build(gen, **build_args), gen.program, profile=gen.profile)
    return CompiledNetwork(library or build(gen, **build_args), gen.program)


def write_report(gen: Generated) -> Path:
    from .report import render

    path = gen.folder / "report.html"
    write_text(path, render(gen))
    return path
