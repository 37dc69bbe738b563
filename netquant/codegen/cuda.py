"""The CUDA printer: the same Program as the C target, printed as one .cu file.

What differs from :class:`~netquant.codegen.c.CPrinter`, and all this subclass overrides:
constants live in device memory, uploaded once by the first call (the persistent network of
MATLAB's ``mynet_predict``): the weights as the C target's binary weights file, pulled into the
library with ``.incbin`` and copied to one device buffer whose tables the kernels reach through
``__device__`` pointers (ResNet-18's .cu: 131 KB, built in 24 s; with its weights as literals it
was 53 MB, 4.8 minutes and 7.7 GB of compiler memory), the small tables as arrays; every step
is a ``__global__`` kernel with one thread per output element: the C kernels' loops over
outputs (``each_offset``, ``each_pixel``, ``each_position``) become the thread's own output, and
the statements inside them, which compute that output, are the C printer's; per-image arenas lie
side by side in one device buffer (the batch size is a run-time argument); the static host code is
``runtime/cuda_host.cu.in``. Convolutions over uint8 use ``dp4a`` (PTX ``dp4a.u32.s32``) four
channels at a time: the kernels checked bit for bit on a GPU (an H100, bench/gpu_check.py). With
``tensor_cores=True`` (sm_80 and newer), they run on int8 tensor cores instead
(``mma.sync.m16n8k32`` u8 x s8 -> s32, an implicit GEMM, see :meth:`CudaPrinter.conv_mma`); these
are checked bit for bit in the test suite's CPU emulation of a warp and await the same check on a
GPU. The integer arithmetic is ``netquant_rt.h``'s, shared with C, so outputs are bit-exact with the
reference executor (nvcc is run with ``--fmad=false`` so no float multiply-add is fused).
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import numpy as np

from .c import CPrinter, Source
from .program import IntConvPlan, Step
from .runtime_files import fill

THREADS = 256
MMA_WARPS = 4        # warps per block of the tensor-core convolution
MMA_MIN_SM = 80      # mma.sync.m16n8k32 with 8-bit operands: sm_80 and newer


def sm_number(arch: str) -> int:
    """75 for "sm_75", 90 for "sm_90a" or "compute_90"."""
    digits = "".join(ch for ch in arch.split("_", 1)[-1] if ch.isdigit())
    if not digits:
        raise ValueError(f"arch {arch!r}: expected sm_XY (for example sm_80 or sm_90)")
    return int(digits)


def arch_list(arch: str) -> list:
    """The GPU architectures of ``arch``: one ("sm_90") or several separated by commas
    ("sm_80,sm_90": one library holding the machine code of each, a fat binary)."""
    archs = [a.strip() for a in str(arch).split(",")]
    if not all(archs):
        raise ValueError(f"arch {arch!r}: expected sm_XY or a comma-separated list (for example sm_80,sm_90)")
    for a in archs:
        sm_number(a)
    return archs


def arch_flags(arch: str) -> str:
    """nvcc's flags for ``arch``: ``-arch=sm_90`` for one; for several, one ``-gencode`` each (the
    front end and host compilation run once, the device code is compiled per architecture)."""
    archs = arch_list(arch)
    if len(archs) == 1:
        return f"-arch={archs[0]}"
    return " ".join(f"-gencode arch=compute_{sm_number(a)},code={a}" for a in archs)


def unroll(o: Source, *loops: str) -> Source:
    """Open nested loops ``for (int v = 0; v < n; ++v)``, each under ``#pragma unroll``, for the pairs
    (v, n) of ``loops``: unroll(o, "i", "MT", "j", "2") opens the i loop and the j loop inside it."""
    for v, n in zip(loops[::2], loops[1::2]):
        o("#pragma unroll")
        o.open(f"for (int {v} = 0; {v} < {n}; ++{v})")
    return o


class CudaPrinter(CPrinter):
    fuses_adds = False   # its conv kernels are its own (c.py fuse_adds: the x86 register tiles)
    file_suffix = ".cu"
    const_qualifier = "static __device__ const"
    kernel_qualifier = "static __global__ void"

    def __init__(self, program, provenance: str = "", arch: str = "sm_90", tensor_cores: bool = False):
        super().__init__(program, provenance)
        self.arch = arch
        self.sm = min(sm_number(a) for a in arch_list(arch))   # the oldest one decides what may be printed
        if tensor_cores and self.sm < MMA_MIN_SM:
            raise ValueError(f"tensor_cores needs sm_{MMA_MIN_SM} or newer (int8 mma.sync.m16n8k32); arch is {arch}")
        self.tensor_cores = tensor_cores

    # --- which conv kernel: dp4a or tensor cores over uint8, the C printer's loop nest otherwise ----
    def dp4a_eligible(self, s: Step) -> bool:
        # ungrouped conv over uint8 input (program.vnni_eligible, which also takes int8 through
        # an offset the dp4a kernels do not apply)
        return isinstance(s.plan, IntConvPlan) and s.plan.simd and self.buf(s.inputs[0]).dtype == "uint8"

    def mma_eligible(self, s: Step) -> bool:
        """Tensor cores (when asked for): uint8 input, channels a multiple of 16 in (so each 16-wide half of a
        32-deep k step lies inside one filter tap) and of 8 out (whole n tiles)."""
        if not self.tensor_cores or not self.dp4a_eligible(s):
            return False
        c = self.hwc(self.buf(s.inputs[0]).shape)[0]
        oc = self.hwc(self.buf(s.output).shape)[0]
        return c % 16 == 0 and oc % 8 == 0

    def kernel_label(self, s: Step) -> str:
        if self.is_element_step(s):
            return self.float_label(s) + ", one thread per output"
        if self.mma_eligible(s):
            return "conv: int8 tensor cores (mma.sync m16n8k32 u8 x s8)"
        if s.kind == "conv" and self.dp4a_eligible(s):
            return "conv: dp4a, one thread per output"
        return f"{s.kind}: one thread per output"

    MMA_MAX_NT = 8   # n tiles of 8 columns per warp: 8 x MT x 4 accumulators in registers

    def mma_tiles(self, s: Step) -> tuple[int, int, int, int]:
        """(k steps of 32, n tiles of 8 per warp, m tiles of 16 per warp, column groups): a warp
        holds the columns of one group, at most MMA_MAX_NT tiles (the largest divisor of O / 8
        that is), so its accumulators stay in registers whatever the layer's width; more m tiles
        where n is narrow, so each weight fragment feeds several mma. Example: O = 512: 64 n
        tiles, 8 groups of 8, 2 m tiles (64 accumulators a lane)."""
        w = s.node.params["weight"]
        k = int(np.prod(w.shape[1:]))
        nt_all = w.shape[0] // 8
        nt = max(d for d in range(1, self.MMA_MAX_NT + 1) if nt_all % d == 0)
        return -(-k // 32), nt, (4 if nt <= 4 else 2), nt_all // nt

    # --- constants: device arrays; a dp4a or tensor-core conv's weights replace the plan's "w" -------
    def conv_tables(self, s: Step) -> dict:
        """The weights of conv ``s`` in the layout of its kernel: "wm" (O, K padded to 32) for tensor
        cores, "wdp" (O, KH, KW, 4*C4) for dp4a; none for the loop nest (it reads the plan's "w")."""
        w = s.plan.w                                  # (O, KH, KW, C)
        if self.mma_eligible(s):
            wm = np.zeros((w.shape[0], 32 * self.mma_tiles(s)[0]), np.int8)
            wm[:, :w[0].size] = w.reshape(w.shape[0], -1)  # (O, K): k = (kh * KW + kw) * C + c
            return {"wm": wm}
        if self.dp4a_eligible(s):
            padded = np.zeros(w.shape[:3] + (4 * -(-w.shape[3] // 4),), np.int8)
            padded[..., :w.shape[3]] = w
            return {"wdp": padded}                     # 4 channels per dp4a
        return {}

    def const_guard(self, s: Step, key: str):
        # every table is read on the device, but the plan's weights where another layout replaces them
        return None if key == "w" and self.dp4a_eligible(s) else ""

    def const_attributes(self, s: Step, key: str) -> str:
        return "__align__(16)" if key == "wm" else ""   # the tensor cores' 32-bit fragment loads

    # --- kernels: one thread per output, in the C printer's kernels with their loops replaced ----
    def signature(self, s: Step) -> str:
        bounds = f"__launch_bounds__({32 * MMA_WARPS}) " if self.mma_eligible(s) else ""
        return f"{self.kernel_qualifier} {bounds}{self.fn_name(s)}(uint8_t *arena, const float *in, float *out, int n)"

    def pointer(self, name: str, const: bool) -> str:
        """Buffer ``name`` of image ``img``: in the input, the output or the image's arena."""
        b = self.buf(name)
        if b.name == self.p.input:
            return f"(in + (size_t)img * {b.elements})"
        if b.name == self.p.output:
            return f"(out + (size_t)img * {b.elements})"
        return f"(({'const ' if const else ''}{b.ctype} *)(arena + (size_t)img * ARENA_BYTES + {b.offset}))"

    def emit_kernel(self, s: Step, o: Source):
        """The tensor-core conv, or: thread idx computes output element e of image img (the C
        kernel of ``s``, whose loops over outputs each_* turn into this e)."""
        if self.mma_eligible(s):
            return self.conv_mma(s, o)
        total = self.buf(s.output).elements
        o("const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;")
        o(f"const int img = (int)(idx / {total}), e = (int)(idx % {total});")
        o("if (img >= n) return;")
        for j, i in enumerate(s.inputs):
            o(f"const {self.buf(i).ctype} *x{j} = {self.pointer(i, True)};")
        o(f"{self.buf(s.output).ctype} *y = {self.pointer(s.output, False)};")
        super().emit_kernel(s, o)

    @contextmanager
    def each_offset(self, o: Source, i: str, n: str, resume: bool = False):
        if i != "e":
            o(f"const int {i} = e;")
        yield

    @contextmanager
    def each_pixel(self, s: Step, o: Source):
        b = self.buf(s.output)
        c, h, w = self.hwc(b.shape)
        if len(b.shape) == 1:
            o("const int c = e;")
        elif b.layout == "nchw":
            o(f"const int c = e / {h * w}, i = e % {h * w};  /* NCHW */")
        else:
            o(f"const int c = e % {c}, i = e / {c};  /* channels-last */")
        yield

    @contextmanager
    def each_position(self, o: Source, c: str, n: str):
        o(f"const int {c} = e % {n}, pix = e / {n}, oh = pix / OW, ow = pix % OW;")
        yield

    def k_conv(self, s: Step, o: Source):
        self.conv_loops(s, o, "wdp" if self.dp4a_eligible(s) else "w")

    def conv_tap(self, s: Step, o: Source, layout: str):
        """dp4a: four channels of tap (kh, kw) per instruction, the last group zero-padded."""
        if layout != "wdp":
            return super().conv_tap(s, o, layout)
        c4 = -(-self.hwc(self.buf(s.inputs[0]).shape)[0] // 4)
        o(f"const int8_t *wp = {self.const_name(s, 'wdp')} + ((o * KH + kh) * KW + kw) * {4 * c4};")
        o.open(f"for (int q = 0; q < {c4}; ++q)")
        o("uint32_t xa = 0, wb;")
        o("for (int j = 0; j < 4 && 4 * q + j < C; ++j) xa |= (uint32_t)xp[4 * q + j] << (8 * j);")
        o("memcpy(&wb, wp + 4 * q, 4);")
        o('asm("dp4a.u32.s32 %0, %1, %2, %0;" : "+r"(acc) : "r"(xa), "r"(wb));')
        o.close()

    def k_concat(self, s: Step, o: Source):
        """The thread's output channel picks its input (the C kernel loops over each input's channels)."""
        oc = self.hwc(self.buf(s.output).shape)[0]
        o(f"const int p = e / {oc}, c = e % {oc};")
        for j, off, cj, value in self.concat_parts(s):
            o(f"if (c >= {off} && c < {off + cj}) y[e] = {value(f'p * {cj} + c - {off}')};")

    def k_maxpool(self, s: Step, o: Source):
        self.pool_loops(s, o, "max")   # no whole-pixel loop: a thread has one output

    def softmax_rows(self, s: Step, o: Source):
        self.e_softmax(s, o)           # each thread its own element (the C kernel: a row at a time)

    def conv_mma(self, s: Step, o: Source):
        """Convolution as an implicit GEMM on int8 tensor cores.

        Rows m are the output pixels of every image of the batch (M = n * OH * OW), columns the
        output channels (N = O), and k = (kh * KW + kw) * C + c runs over the filter (K = KH*KW*C,
        zero-padded to a multiple of 32). One warp computes 16*MT rows x NT*8 columns (one of NG
        column groups, mma_tiles) with a loop over the k steps, each
        ``mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32``: unsigned activations times signed
        weights, exact int32 sums, so the result equals the reference executor's bit for bit.
        Fragments come straight from memory (PTX ISA layout; g = lane / 4, t = lane % 4):
        A register 2*half + h holds row g + 8h, k = 16*half + 4t .. +3: four consecutive channels
        of one tap, one aligned 32-bit load (C % 16 == 0), or 0 in the padding; B register half
        holds column g, the same k: 4 bytes of the (O, KP) weight rows. Accumulator j holds row
        g + 8*(j/2), column 2t + j%2. Example, S3U1_conv2 (C = O = 64, 8x8): K = 576 = 18 steps,
        8 n tiles, 2 m tiles: 288 mma per warp for 32 pixels x 64 channels. ResNet-50's layer4 3x3
        conv (C = O = 512): 144 k steps, 8 groups of 8 n tiles, each warp 32 pixels x 64 channels.
        """
        ksteps, nt, mt, ng = self.mma_tiles(s)
        lo, hi = s.node.attrs["clamp"]
        xin, yout = self.buf(s.inputs[0]), self.buf(s.output)
        assert xin.offset >= 0 and yout.offset >= 0, "tensor-core convolutions read and write the arena"
        WM, B, M, S = (self.const_name(s, k) for k in ("wm", "bias", "mult", "shift"))
        o(self.conv_enum(s))
        o(f"enum {{ OHW = OH * OW, K = KH * KW * C, KSTEPS = {ksteps}, KP = 32 * KSTEPS, NT = {nt}, MT = {mt}, "
          f"NG = {ng} }};")
        o("(void)in; (void)out;")
        o("const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;")
        o("const long rows = (long)n * OHW;")
        o("/* warp w: rows of tile w / NG, the NT * 8 columns of group w % NG from column c0 */")
        o("const long w = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);")
        o("const long row0 = (w / NG) * (16 * MT);")
        o("const int c0 = (int)(w % NG) * NT * 8;")
        o("if (row0 >= rows) return;  /* whole warps leave together: the tensor-core instruction needs all 32 lanes */")
        o("/* the 2*MT rows whose A fragments this lane loads: row0 + 16*i + g + 8*j */")
        o("const uint8_t *xb[MT][2];")
        o("int ih0[MT][2], iw0[MT][2];")
        o("bool valid[MT][2];")
        unroll(o, "i", "MT", "j", "2")
        o("const long r = row0 + 16 * i + g + 8 * j;")
        o("valid[i][j] = r < rows;")
        o("const long rr = valid[i][j] ? r : 0;")
        o("const int img = (int)(rr / OHW), pix = (int)(rr % OHW);")
        o(f"xb[i][j] = arena + (size_t)img * ARENA_BYTES + {xin.offset};")
        o("ih0[i][j] = (pix / OW) * SH - PH;")
        o("iw0[i][j] = (pix % OW) * SW - PW;")
        o.close().close()
        o("int32_t acc[MT][NT][4];")
        o("#pragma unroll")
        o("for (int i = 0; i < MT; ++i)")
        o("    #pragma unroll")
        o("    for (int q = 0; q < NT; ++q) acc[i][q][0] = acc[i][q][1] = acc[i][q][2] = acc[i][q][3] = 0;")
        o("#pragma unroll 2  /* a loop, not KSTEPS copies: ResNet-50's 3x3 convs have 144 k steps */")
        o.open("for (int ks = 0; ks < KSTEPS; ++ks)")
        o("uint32_t af[MT][4];")
        unroll(o, "half", "2")
        o("const int kb = ks * 32 + half * 16;")
        o("const int tap = kb / C, kh = tap / KW, kw = tap % KW, ch = kb % C + 4 * t;")
        unroll(o, "i", "MT", "j", "2")
        o("const int ih = ih0[i][j] + kh * DH, iw = iw0[i][j] + kw * DW;")
        o("const bool inside = kb < K && valid[i][j] && (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W;")
        o("af[i][2 * half + j] = inside ? *(const uint32_t *)(xb[i][j] + (ih * W + iw) * C + ch) : 0u;")
        o.close().close().close()
        unroll(o, "q", "NT")
        o(f"const int8_t *wp = {WM} + (c0 + q * 8 + g) * KP + ks * 32 + 4 * t;")
        o("const uint32_t b0 = __ldg((const unsigned int *)wp), b1 = __ldg((const unsigned int *)(wp + 16));")
        unroll(o, "i", "MT")
        o('asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, '
          '{%8,%9}, {%0,%1,%2,%3};"')
        o('             : "+r"(acc[i][q][0]), "+r"(acc[i][q][1]), "+r"(acc[i][q][2]), "+r"(acc[i][q][3])')
        o('             : "r"(af[i][0]), "r"(af[i][1]), "r"(af[i][2]), "r"(af[i][3]), "r"(b0), "r"(b1));')
        o.close().close().close()
        o("/* requantize and store: lane holds columns 2t, 2t+1 of rows g and g + 8 of each tile */")
        unroll(o, "i", "MT", "j", "2")
        o("if (!valid[i][j]) continue;")
        o("const long r = row0 + 16 * i + g + 8 * j;")
        o("const int img = (int)(r / OHW), pix = (int)(r % OHW);")
        o(f"{yout.ctype} *y = ({yout.ctype} *)(arena + (size_t)img * ARENA_BYTES + {yout.offset}) + pix * O;")
        unroll(o, "q", "NT")
        o("const int col = c0 + q * 8 + 2 * t;")
        o(f"const {yout.ctype} v0 = ({yout.ctype})nq_requantize((int64_t){B}[col] + acc[i][q][2 * j], "
          f"{M}[col], {S}[col], {lo}, {hi});")
        o(f"const {yout.ctype} v1 = ({yout.ctype})nq_requantize((int64_t){B}[col + 1] + acc[i][q][2 * j + 1], "
          f"{M}[col + 1], {S}[col + 1], {lo}, {hi});")
        o("y[col] = v0;")
        o("y[col + 1] = v1;")
        o.close().close().close()

    # --- host side: cuda_host.cu.in around the network's sizes, constants, kernels and launches ---
    def blob_reference(self, name: str, ctype: str, offset: int, size: int) -> str:
        """A table of the weights file on the device: a pointer that upload_constants() sets to
        its place in the one device copy of the file (the .cu holds no weights as text: ResNet-18's
        was 53 MB of literals)."""
        return f"static __device__ const {ctype} *{name};  /* {size} x {ctype} at byte {offset} of the weights file */"

    def upload_constants(self) -> str:
        """nq_upload_constants(): the weights file (in the library, .incbin) copied to the device
        once, and every table's device pointer set to its place in it."""
        n = self.p.name
        o = Source()
        o("static uint8_t *d_blob = NULL;  /* the weights file on the device */")
        o("static int nq_uploaded = 0;")
        o.open("static int nq_upload_constants(void)")
        o("if (nq_uploaded) return NQ_OK;")
        if self.blob:
            o(f"if (!d_blob) NQ_CUDA(cudaMalloc((void **)&d_blob, {len(self.blob)}));  /* kept if a copy below fails */")
            o(f"NQ_CUDA(cudaMemcpy(d_blob, {n}_blob, {len(self.blob)}, cudaMemcpyHostToDevice));")
            for name, off in self.blob_offsets.items():
                o(f"{{ const void *p = d_blob + {off}; NQ_CUDA(cudaMemcpyToSymbol({name}, &p, sizeof p)); }}")
        o("nq_uploaded = 1;")
        o("return NQ_OK;")
        o.close()
        return o.text()

    def source(self) -> str:
        p = self.p
        q = self.buf(p.int_input) if p.int_input else None
        k = next((i for i, s in enumerate(p.steps) if s.output == p.int_input), -1)
        ib = self.buf(p.int_output)
        ic, ih, iw = self.hwc(ib.shape)
        qc, qh, qw = self.hwc(q.shape) if q else (1, 1, 1)
        return fill("cuda_host.cu.in", header_comment=self.header_comment(), net=p.name,
                    arena_bytes=-(-max(p.arena_bytes, 64) // 64) * 64, in_size=self.buf(p.input).elements,
                    classes=p.classes, int8_input=int(q is not None), q_size=q.elements if q else 1,
                    q_type=q.ctype if q else "int8_t", q_channels=qc, q_pixels=qh * qw, q_offset=q.offset if q else 0,
                    int_out=ib.elements, int_type=ib.ctype, int_channels=ic, int_pixels=ih * iw, int_offset=ib.offset,
                    constants=self.constants(), blob=self.blob_decl(), kernels=self.step_functions(),
                    input_steps=self.launches(p.steps[:k + 1]), other_steps=self.launches(p.steps[k + 1:]),
                    threads=THREADS, kernels_name="cuda-mma" if self.tensor_cores else "cuda-dp4a",
                    upload=self.upload_constants())

    def launches(self, steps) -> str:
        """The kernel launches of ``steps`` for n images, one line each (indented for their function)."""
        o = Source()
        o.level = 1
        for s in steps:
            if self.mma_eligible(s):
                _, _, mt, ng = self.mma_tiles(s)
                oh, ow = self.hwc(self.buf(s.output).shape)[1:]
                warps = f"nq_grid(n, {oh * ow}, {16 * mt}) * {ng}L"   # row tiles x column groups
                o(f"{self.fn_name(s)}<<<(unsigned)(({warps} + {MMA_WARPS - 1}) / {MMA_WARPS}), {32 * MMA_WARPS}>>>"
                  f"(d_arena, d_in, d_out, n);")
            else:
                o(f"{self.fn_name(s)}<<<nq_grid(n, {self.buf(s.output).elements}, {THREADS}), {THREADS}>>>"
                  f"(d_arena, d_in, d_out, n);")
        return o.text() if steps else ""

    def makefile(self, cflags: str) -> str:
        n = self.p.name
        return f"""# Generated by netquant. make: lib{n}.so
NVCC ?= nvcc
NVFLAGS ?= {cflags}
lib{n}.so: {n}.cu {n}.h netquant_rt.h {n}_weights.bin
\t$(NVCC) $(NVFLAGS) -shared -o $@ {n}.cu
"""

    def files(self, cflags: str) -> dict:
        files = super().files(cflags)
        files.pop("main.c")  # the C test bench is host-only; the CUDA library is checked from Python
        return files

    def device_entry_declaration(self) -> str:
        return fill("cuda_header_entry.h.in", net=self.p.name)


_PTXAS_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '(\w+)' for '(\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"ptxas info\s*: Used (\d+) registers")


def kernel_name(mangled: str) -> str:
    """The source name of a kernel from its Itanium-mangled one: "_Z15step_S1U1_conv1PKhPhi" ->
    "step_S1U1_conv1" (an unmangled name is returned as it is)."""
    m = re.match(r"_Z(\d+)(\w+)", mangled)
    return m.group(2)[:int(m.group(1))] if m else mangled


def ptxas_resources(stderr: str) -> tuple[list, str]:
    """nvcc's stderr of a build with ``-Xptxas -v`` split into (one dict per device function and
    architecture: kernel, arch, registers, stack (bytes of stack frame), spill_stores,
    spill_loads; the rest of stderr: the compiler's warnings). Example: the lines
    "ptxas info : Compiling entry function '_Z6step_xPKhPh' for 'sm_90'", "0 bytes stack frame,
    0 bytes spill stores, 0 bytes spill loads", "ptxas info : Used 30 registers, ..." give
    {"kernel": "step_x", "arch": "sm_90", "registers": 30, "stack": 0, "spill_stores": 0,
    "spill_loads": 0}."""
    kernels, rest, cur = [], [], None
    for line in stderr.splitlines():
        entry = _PTXAS_ENTRY.search(line)
        frame = _PTXAS_FRAME.search(line)
        regs = _PTXAS_REGS.search(line)
        if entry:
            cur = {"kernel": kernel_name(entry.group(1)), "arch": entry.group(2), "registers": 0, "stack": 0,
                   "spill_stores": 0, "spill_loads": 0}
            kernels.append(cur)
        elif frame and cur is not None:
            cur.update(stack=int(frame.group(1)), spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))
        elif regs and cur is not None:
            cur["registers"] = int(regs.group(1))
        elif not line.startswith("ptxas info"):
            rest.append(line)
    return kernels, "\n".join(rest).strip() + ("\n" if any(x.strip() for x in rest) else "")
