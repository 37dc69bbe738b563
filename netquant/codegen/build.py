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
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..progress import Progress, report
from .c import CPrinter
from .program import Program, plan

log = logging.getLogger(__name__)

ISA_FLAGS = {
    "native": "-O3 -march=native",                    # this CPU's best: AMX, else AVX-512 VNNI, else portable C
    "avx512": "-O3 -march=native -DNQ_NO_AMX",        # AVX-512 VNNI even where AMX is present
    "avx2": "-O3 -mavx2 -mfma",
    "scalar": "-O2 -fno-tree-vectorize -DNQ_NO_SIMD",  # the portable path
}
COMMON_FLAGS = "-std=c11 -fPIC -fopenmp -ffp-contract=off -Wall -Wextra -Wno-unused-parameter"


class BuildError(RuntimeError):
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

    @property
    def name(self) -> str:
        return self.program.name


CUDA_FLAGS = "-O3 --fmad=false -Xcompiler -fPIC -std=c++17 -Werror all-warnings"


def generate(qnet, out: str | os.PathLike, name: str = "net", target: str = "c", isa: str = "native",
             provenance: str = "", progress: Optional[Progress] = None, arch: str = "sm_90",
             tensor_cores: bool = False) -> Generated:
    """Write the sources of ``qnet`` (a QuantizedNetwork or QGraph) for ``target`` ("c", or
    "cuda" for GPU ``arch``; ``tensor_cores``: int8 mma convolutions, sm_80 and newer) into ``out``."""
    if target not in ("c", "cuda"):
        raise ValueError(f"unknown code generation target {target!r}: c or cuda")
    if target == "c" and isa not in ISA_FLAGS:
        raise ValueError(f"unknown isa {isa!r}; choose from {', '.join(ISA_FLAGS)}")
    qgraph = getattr(qnet, "qgraph", qnet)
    report(progress, 0, 3, "planning")
    program = plan(qgraph, name)
    if target == "cuda":
        from .cuda import CudaPrinter

        printer = CudaPrinter(program, provenance or "netquant integer network", arch=arch, tensor_cores=tensor_cores)
        cflags = f"{CUDA_FLAGS} -arch={arch}"
    else:
        printer = CPrinter(program, provenance or "netquant integer network")
        cflags = f"{ISA_FLAGS[isa]} {COMMON_FLAGS}"
    report(progress, 1, 3, "printing")
    files = printer.files(cflags)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for fname, text in files.items():
        (folder / fname).write_text(text)
    gen = Generated(folder, program, target, {k: v.count("\n") for k, v in files.items()}, cflags,
                    kernels={s.node.name: printer.kernel_label(s) for s in program.steps})
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
    Returns the path of the shared library."""
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
    cmd = [compiler, *gen.cflags.split(), "-shared", "-o", lib_name, src.name] + (["-lm"] if gen.target == "c" else [])
    h = hashlib.sha256(" ".join(cmd[1:]).encode())
    for fname in sorted(gen.files):
        h.update(fname.encode())
        h.update((gen.folder / fname).read_bytes())
    key = h.hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else gen.folder / ".build"
    target = cache / key / lib_name
    report(progress, 0, 1, "compiling")
    if target.exists():
        gen.build = {"command": " ".join(cmd), "seconds": 0.0, "warnings": "", "library": str(target), "cached": True}
        report(progress, 1, 1, "cached")
        return target
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=gen.folder, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"compiling {src} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(gen.folder / lib_name, target)
    gen.build = {"command": " ".join(cmd), "seconds": round(time.time() - t0, 2), "warnings": proc.stderr,
                 "library": str(target), "cached": False}
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
        self._predict = getattr(self.lib, f"{n}_predict")
        self._predict.argtypes, self._predict.restype = [f, ctypes.c_int, f], ctypes.c_int
        self._predict_int8 = getattr(self.lib, f"{n}_predict_int8")
        self._predict_int8.argtypes = [ctypes.POINTER(ctypes.c_int8), ctypes.c_int, f]
        self._predict_int8.restype = ctypes.c_int
        self._predict_int = getattr(self.lib, f"{n}_predict_int")
        self._predict_int.argtypes = [f, ctypes.c_int, ctypes.POINTER(ctypes.c_int32)]
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
        return self._threads(int(threads))

    def _images(self, images) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[1:] != self.input_shape:
            raise ValueError(f"predict: expected images of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {x.shape}")
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / np.float32(255)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError("predict: images hold NaN or inf values")
        return x

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"{self.program.name}_predict failed: {self._error(rc).decode()} (code {rc})")

    def predict(self, images) -> np.ndarray:
        """Scores (N, classes) for float images in [0, 1] (or uint8), NCHW."""
        x = self._images(images)
        out = np.empty((len(x), self.program.classes), np.float32)
        self._check(self._predict(x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), len(x),
                                  out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))))
        return out

    __call__ = predict

    def predict_int(self, images) -> np.ndarray:
        """The integer output tensor (before dequantization), for bit-exact comparison."""
        x = self._images(images)
        size = self.program.buffer(self.program.int_output).elements
        out = np.empty((len(x), size), np.int32)
        self._check(self._predict_int(x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), len(x),
                                      out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))))
        return out

    def predict_int8(self, qimages) -> np.ndarray:
        """Scores from already quantized input (N, C, H, W) int8."""
        q = np.ascontiguousarray(qimages, dtype=np.int8)
        out = np.empty((len(q), self.program.classes), np.float32)
        self._check(self._predict_int8(q.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)), len(q),
                                       out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))))
        return out

    def raw_call(self, images_ptr, n: int, scores_ptr) -> int:
        """The C entry point itself (for tests of its own argument checks)."""
        return self._predict(images_ptr, n, scores_ptr)


def load(gen: Generated, library: Optional[str | os.PathLike] = None, **build_args) -> CompiledNetwork:
    """Build if needed and return the callable network."""
    return CompiledNetwork(library or build(gen, **build_args), gen.program)


def write_report(gen: Generated) -> Path:
    from .report import render

    path = gen.folder / "report.html"
    path.write_text(render(gen))
    return path
