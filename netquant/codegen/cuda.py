"""The CUDA printer: the same Program as the C target, printed as one .cu file.

What differs from :class:`~netquant.codegen.c.CPrinter`, and all this subclass overrides:
constants live in device memory, uploaded once by the first call (the persistent network of
MATLAB's ``mynet_predict``): the weights as the C target's binary weights file, pulled into the
library with ``.incbin`` and copied to one device buffer whose tables the kernels reach through
``__device__`` pointers (ResNet-18's .cu: 131 KB, built in 24 s; with its weights as literals it
was 53 MB, 4.8 minutes and 7.7 GB of compiler memory), the small tables as arrays.

Every step is a ``__global__`` kernel. Convolutions run on int8 tensor cores where every
architecture of ``arch`` has them (sm_80 and newer; :meth:`CudaPrinter.conv_mma`: block tiles
through shared memory with ``cp.async``, ``ldmatrix``, ``mma.sync.m16n8k32`` u8 x s8, a fused
residual add and 16-byte stores in the epilogue), on ``dp4a`` (four channels an instruction, one
thread per output) before that or where a conv does not fit the tiles. Every other step has one
thread per output element: the C kernels' loops over outputs (``each_offset``, ``each_pixel``,
``each_position``) become the thread's own output, and the statements inside them, which compute
that output, are the C printer's. Per-image arenas lie side by side in one device buffer (the
batch size is a run-time argument); the static host code, with the forward pass as a CUDA graph,
is ``runtime/cuda_host.cu.in``. The integer arithmetic is ``netquant_rt.h``'s, shared with C, so
outputs are bit-exact with the reference executor (nvcc runs with ``--fmad=false`` so no float
multiply-add is fused). The dp4a kernels were checked bit for bit on a GPU (an H100,
bench/gpu_check.py); the tensor-core kernels, the graph and everything else in the test suite's
CPU emulation (netquant/codegen/cuda_emulation.py), awaiting the same check on a GPU.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import numpy as np

from .c import CPrinter, Source
from .program import Buffer, IntConvPlan, Step, disjoint
from .runtime_files import fill
from .x86_pack import vnni_bias

THREADS = 256
MMA_WARPS = 4        # warps per block of the tensor-core convolution
MMA_THREADS = 32 * MMA_WARPS
MMA_MIN_SM = 80      # mma.sync.m16n8k32 with 8-bit operands and cp.async: sm_80 and newer
MMA_BM = 128         # output pixels (GEMM rows) per block
MMA_BK = 64          # bytes of k per shared-memory stage: two mma k steps
MMA_STAGES = 3       # shared-memory buffers in flight (cp.async groups)
MMA_LDS = MMA_BK + 16   # bytes between shared rows: 16-byte aligned for ldmatrix, its 8 rows in distinct banks

# The PTX the tensor-core kernels use, one small function each (the test suite's warp emulation
# replaces this block, between its two marker lines, by CPU versions of the same functions).
PTX_HELPERS = r"""/* ---- PTX of the tensor-core kernels (sm_80 and newer; inline, not static: a kernel set that
 * needs only some of them compiles without unused-function warnings) ---- */
/* 16 bytes global -> shared, asynchronous; src_bytes < 16 zero-fills the rest (0: all zeros).
 * .cg (L2 only) for the weights, read once a block; .ca (L1 too) for the input, whose pixels a
 * 3x3 conv reads for up to 9 taps, as CUTLASS's implicit GEMM does */
__device__ __forceinline__ void nq_cp_async16(void *smem, const void *gmem, int src_bytes) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void nq_cp_async16_l1(void *smem, const void *gmem, int src_bytes) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" :: "r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
/* close this thread's group of copies */
__device__ __forceinline__ void nq_cp_async_commit(void) { asm volatile("cp.async.commit_group;" ::: "memory"); }
/* wait until at most N of this thread's groups are in flight */
template <int N> __device__ __forceinline__ void nq_cp_async_wait(void) {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}
/* four 8x8 matrices of 16-bit elements (8 rows of 16 bytes each): lanes 8j..8j+7 give the row
 * addresses of matrix j; lane l receives bytes 4(l%4)..+3 of row l/4 of each, in r[j] */
__device__ __forceinline__ void nq_ldmatrix_x4(uint32_t *r, const void *smem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s) : "memory");
}
/* the same, two matrices (lanes 0-15 give the addresses) */
__device__ __forceinline__ void nq_ldmatrix_x2(uint32_t *r, const void *smem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(s) : "memory");
}
/* d += A (16x32 u8, 4 registers) x B (32x8 s8, 2 registers), int32 */
__device__ __forceinline__ void nq_mma_u8s8(int32_t *d, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
/* ---- end of the PTX ---- */
"""


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
    fuses_adds = True    # into the tensor-core convs' epilogue (fusable)
    file_suffix = ".cu"
    const_qualifier = "static __device__ const"
    kernel_qualifier = "static __global__ void"

    def __init__(self, program, provenance: str = "", arch: str = "sm_90", tensor_cores: bool | None = None,
                 fuse_adds: bool = True):
        """``tensor_cores``: int8 tensor-core convolutions (sm_80 and newer); None: where every
        architecture of ``arch`` has them, dp4a otherwise."""
        self.arch = arch
        self.sm = min(sm_number(a) for a in arch_list(arch))   # the oldest one decides what may be printed
        if tensor_cores is None:
            tensor_cores = self.sm >= MMA_MIN_SM
        if tensor_cores and self.sm < MMA_MIN_SM:
            raise ValueError(f"tensor_cores needs sm_{MMA_MIN_SM} or newer (int8 mma.sync.m16n8k32, cp.async); "
                             f"arch is {arch}")
        self.tensor_cores = bool(tensor_cores)
        super().__init__(program, provenance, fuse_adds=fuse_adds)   # after tensor_cores: fusable asks mma_eligible

    # --- which conv kernel: dp4a or tensor cores over uint8, the C printer's loop nest otherwise ----
    def dp4a_eligible(self, s: Step) -> bool:
        # ungrouped conv over uint8 input (program.vnni_eligible, which also takes int8 through
        # an offset the dp4a kernels do not apply)
        return isinstance(s.plan, IntConvPlan) and s.plan.simd and self.buf(s.inputs[0]).dtype == "uint8"

    def mma_eligible(self, s: Step) -> bool:
        """Tensor cores (when asked for): an ungrouped conv over 8-bit input in the arena, 8-bit output
        of a multiple of 8 channels (whole n tiles, 8- or 16-byte stores) at a 16-byte aligned
        arena offset."""
        if not (self.tensor_cores and isinstance(s.plan, IntConvPlan) and s.plan.simd):
            return False
        x, y = self.buf(s.inputs[0]), self.buf(s.output)
        return (x.dtype in ("int8", "uint8") and y.dtype in ("int8", "uint8") and self.hwc(y.shape)[0] % 8 == 0
                and x.offset >= 0 and y.offset >= 0 and y.offset % 16 == 0)

    def mma_copies(self, s: Step) -> bool:
        """Whether tensor-core conv ``s`` copies its input pieces with cp.async: uint8 channels, a
        multiple of 16 of them (each 16-byte piece of a k tile lies inside one filter tap) at a
        16-byte aligned offset. Otherwise (an RGB stem, int8 input) each thread gathers its 16
        bytes one by one (int8 read as x + 128, the bias less 128 x the weights' sum)."""
        x = self.buf(s.inputs[0])
        return x.dtype == "uint8" and self.hwc(x.shape)[0] % 16 == 0 and x.offset % 16 == 0

    def epilogue_takes_add(self, s: Step, add: Step, skip: Buffer, y: Buffer) -> bool:
        """A residual add goes into the epilogue of a tensor-core conv, which reads 16 bytes of
        ``skip`` where the 16 output bytes go: both at 16-byte aligned arena offsets, and the
        output either apart from the skip or on it (each piece is read before it is written, by
        the same thread)."""
        return (self.mma_eligible(s) and all(b.offset >= 0 and b.offset % 16 == 0 for b in (skip, y))
                and (disjoint(skip, y) or skip.offset == y.offset))
    def _kernel_label(self, s: Step) -> str:
        if self.is_element_step(s):
            return self.float_label(s) + ", one thread per output"
        if self.mma_eligible(s):
            bn = self.mma_tiles(s)[0]
            return (f"conv: int8 tensor cores, {MMA_BM} x {bn} tiles of {MMA_WARPS} warps (cp.async {MMA_STAGES} stages, "
                    f"ldmatrix, mma.sync m16n8k32 u8 x s8, {16 if bn % 16 == 0 else 8}-byte stores)")
        if s.kind == "conv" and self.dp4a_eligible(s):
            return "conv: dp4a, one thread per output"
        return f"{s.kind}: one thread per output"

    def mma_tiles(self, s: Step) -> tuple[int, int, int, int, int]:
        """(BN columns a block, warps along n, MT m tiles of 16 and NT n tiles of 8 a warp, KT k
        tiles of 64) of tensor-core conv ``s``: BN the largest of 64, 32, 16, 8 dividing O; the 4
        warps as 2 x 2 (BN = 64: each 64 rows x 32 columns) or 4 x 1 (each 32 rows x BN).
        Example: O = 256, K = 2304: (64, 2, 4, 4, 36), 64 accumulators a lane; O = 24: BN = 8,
        three column tiles."""
        w = s.node.params["weight"]
        k = int(np.prod(w.shape[1:]))
        bn = next(b for b in (64, 32, 16, 8) if w.shape[0] % b == 0)
        warps_n = 2 if bn == 64 else 1
        warp_rows = MMA_BM // (MMA_WARPS // warps_n)
        return bn, warps_n, warp_rows // 16, bn // warps_n // 8, -(-k // MMA_BK)

    # --- constants: device arrays; a dp4a or tensor-core conv's weights replace the plan's "w" -------
    def conv_tables(self, s: Step) -> dict:
        """The weights of conv ``s`` in the layout of its kernel: "wm" (O, K padded to 64) for tensor
        cores, "wdp" (O, KH, KW, 4*C4) for dp4a; none for the loop nest (it reads the plan's "w")."""
        w = s.plan.w                                  # (O, KH, KW, C)
        if self.mma_eligible(s):
            wm = np.zeros((w.shape[0], MMA_BK * self.mma_tiles(s)[4]), np.int8)
            wm[:, :w[0].size] = w.reshape(w.shape[0], -1)  # (O, K): k = (kh * KW + kw) * C + c
            if self.buf(s.inputs[0]).dtype == "int8":   # read as x + 128, as the VNNI kernels do
                return {"wm": wm, "bm": vnni_bias(s.plan.bias, w)}
            return {"wm": wm}
        if self.dp4a_eligible(s):
            padded = np.zeros(w.shape[:3] + (4 * -(-w.shape[3] // 4),), np.int8)
            padded[..., :w.shape[3]] = w
            return {"wdp": padded}                     # 4 channels per dp4a
        return {}

    def const_guard(self, s: Step, key: str):
        # every table is read on the device, but the plan's weights where another layout replaces them
        if key == "w" and (self.dp4a_eligible(s) or self.mma_eligible(s)):
            return None
        if key == "bias" and self.mma_eligible(s) and self.buf(s.inputs[0]).dtype == "int8":
            return None   # "bm" replaces it
        return ""

    def const_attributes(self, s: Step, key: str) -> str:
        return "__align__(16)" if key == "wm" else ""   # the tensor cores' 32-bit fragment loads

    # --- kernels: one thread per output, in the C printer's kernels with their loops replaced ----
    def signature(self, s: Step) -> str:
        bounds = f"__launch_bounds__({MMA_THREADS}) " if self.mma_eligible(s) else ""
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
        """Convolution as an implicit GEMM on int8 tensor cores, tiles staged through shared memory.

        Rows m are the output pixels of every image of the batch (M = n * OH * OW), columns the
        output channels (N = O), and k = (kh * KW + kw) * C + c runs over the filter (K = KH*KW*C,
        zero-padded to KP, a multiple of BK = 64). A block of 4 warps computes BM = 128 rows x BN
        columns (mma_tiles); blocks are numbered row tile by row tile, column tiles fastest, so
        the blocks that read the same pixels run together. Per 64-deep k tile:

        - every thread copies 16-byte pieces global -> shared with ``cp.async`` (STAGES = 3
          buffers: the copies of tile kt + 2 run while tile kt is multiplied): the A piece of
          row r at k chunk kb is 16 consecutive channels of one filter tap (C % 16 == 0), zero
          filled (source size 0) in the padding and past K; B pieces are 16 bytes of the
          (O, KP) weight rows. Shared rows are LDS = 80 bytes apart, so the 8 rows an
          ``ldmatrix`` reads fall in 8 distinct 4-bank groups (80 bytes = 20 banks: 0, 20, 8, 28, ...).
        - each warp loads its fragments with ``ldmatrix.x4`` (A: MT tiles of 16 rows x 32 k;
          B: two n tiles of 8 columns x 32 k per instruction) and issues MT x NT
          ``mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32`` per 32-deep k step: unsigned
          activations times signed weights, exact int32 sums, so the result equals the reference
          executor's bit for bit.

        Epilogue: bias + requantization + clamp (the ReLU) per column into a BM x BN byte tile in
        shared memory, then 16-byte stores of whole 16-channel pieces of each output pixel;
        a residual add fused into the conv (fuse_adds) reads the other input 16 bytes at a
        time there and applies the add's own formula. Example, ResNet-50's layer4 3x3 conv
        (C = O = 512, 7x7): K = 4608 = 72 k tiles, BN = 64: 8 column tiles, each warp 64 rows x
        32 columns (MT = 4, NT = 4: 64 accumulators a lane); at batch 256, 98 row tiles.
        """
        bn, warps_n, mt, nt, kt = self.mma_tiles(s)
        lo, hi = s.node.attrs["clamp"]
        xin, yout = self.buf(s.inputs[0]), self.buf(s.output)
        signed = xin.dtype == "int8"
        WM, B, M, S = (self.const_name(s, k) for k in ("wm", "bm" if signed else "bias", "mult", "shift"))
        conv_t = "uint8_t" if lo >= 0 else "int8_t"   # the conv's own 8-bit output (before a fused add)
        o(self.conv_enum(s))
        o(f"enum {{ OHW = OH * OW, K = KH * KW * C, KT = {kt}, KP = {MMA_BK} * KT, BM = {MMA_BM}, BN = {bn}, "
          f"WARPS_N = {warps_n}, MT = {mt}, NT = {nt}, STAGES = {MMA_STAGES}, LDS = {MMA_LDS}, LDC = BN + 16, "
          f"ROWS_PER_THREAD = BM / 32, B_PIECES = (BN * 4 + {MMA_THREADS - 1}) / {MMA_THREADS} }};")
        o("(void)in; (void)out;")
        o("__shared__ __align__(128) uint8_t smem[STAGES * (BM + BN) * LDS];  /* per stage: A rows, then B rows */")
        o("const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;")
        o("const int wm = warp / WARPS_N, wn = warp % WARPS_N;  /* the warp's 16*MT rows and 8*NT columns */")
        o("const long rows = (long)n * OHW;")
        o("const long row0 = (long)(blockIdx.x / (O / BN)) * BM;  /* column tiles fastest */")
        o("const int col0 = (int)(blockIdx.x % (O / BN)) * BN;")
        o("/* the A rows this thread copies: tid / 4 + 32 * j, at k chunk tid % 4 of each k tile */")
        o("const uint8_t *xb[ROWS_PER_THREAD];")
        o("int ih0[ROWS_PER_THREAD], iw0[ROWS_PER_THREAD];")
        o("bool valid[ROWS_PER_THREAD];")
        unroll(o, "j", "ROWS_PER_THREAD")
        o("const long r = row0 + tid / 4 + 32 * j;")
        o("valid[j] = r < rows;")
        o("const long rr = valid[j] ? r : 0;")
        o("const int img = (int)(rr / OHW), pix = (int)(rr % OHW);")
        o(f"xb[j] = arena + (size_t)img * ARENA_BYTES + {xin.offset};")
        o("ih0[j] = (pix / OW) * SH - PH;")
        o("iw0[j] = (pix % OW) * SW - PW;")
        o.close()
        o(f"const int8_t *wrow = {WM} + (size_t)col0 * KP;")
        o("/* k tile kt -> stage st: 16 bytes a cp.async, zero-filled (source size 0) outside the image and past K */")
        o.open("auto load_tile = [&](int kt, int st)")
        o("uint8_t *sa = smem + st * (BM + BN) * LDS, *sb = sa + BM * LDS;")
        o("const int kb = kt * 64 + 16 * (tid & 3);")
        if self.mma_copies(s):
            o("const int tap = kb / C, ch = kb % C, kh = tap / KW, kw = tap % KW;")
            unroll(o, "j", "ROWS_PER_THREAD")
            o("const int ih = ih0[j] + kh * DH, iw = iw0[j] + kw * DW;")
            o("const bool inside = kb < K && valid[j] && (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W;")
            o("nq_cp_async16_l1(sa + (tid / 4 + 32 * j) * LDS + 16 * (tid & 3), inside ? xb[j] + (ih * W + iw) * C + ch : xb[j], "
              "inside ? 16 : 0);")
            o.close()
        else:
            pad = "0x80u" if signed else "0u"
            flip = " ^ 0x80u" if signed else ""
            o(f"/* gathered byte by byte (a piece spans taps); {'int8 read as x + 128 (x ^ 0x80), the padding as 128' if signed else 'the padding 0'} */")
            unroll(o, "j", "ROWS_PER_THREAD")
            o("uint32_t word[4] = {0u, 0u, 0u, 0u};")
            unroll(o, "e", "16")
            o("const int k = kb + e, tap = k / C, c = k % C, kh = tap / KW, kw = tap % KW;")
            o("const int ih = ih0[j] + kh * DH, iw = iw0[j] + kw * DW;")
            o("const bool inside = k < K && valid[j] && (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W;")
            o(f"word[e >> 2] |= (inside ? (uint32_t)__ldg(xb[j] + (ih * W + iw) * C + c){flip} : {pad}) << (8 * (e & 3));")
            o.close()
            o("*(uint4 *)(sa + (tid / 4 + 32 * j) * LDS + 16 * (tid & 3)) = make_uint4(word[0], word[1], word[2], word[3]);")
            o.close()
        unroll(o, "j", "B_PIECES")
        o(f"const int id = tid + {MMA_THREADS} * j;")
        o(f"if (BN * 4 % {MMA_THREADS} == 0 || id < BN * 4)")
        o("    nq_cp_async16(sb + (id / 4) * LDS + 16 * (id & 3), wrow + (size_t)(id / 4) * KP + kt * 64 + 16 * (id & 3), 16);")
        o.close()
        o.close(";")
        o("int32_t acc[MT][NT][4];")
        unroll(o, "i", "MT", "q", "NT")
        o("acc[i][q][0] = acc[i][q][1] = acc[i][q][2] = acc[i][q][3] = 0;")
        o.close().close()
        unroll(o, "st", "STAGES - 1")
        o("if (st < KT) load_tile(st, st);")
        o("nq_cp_async_commit();  /* one group a stage, empty or not: the wait below counts groups */")
        o.close()
        o.open("for (int kt = 0; kt < KT; ++kt)")
        o("nq_cp_async_wait<STAGES - 2>();  /* this thread's copies of tile kt have landed */")
        o("__syncthreads();                 /* ... every thread's; and tile kt - 1's stage is read: refill it */")
        o("if (kt + STAGES - 1 < KT) load_tile(kt + STAGES - 1, (kt + STAGES - 1) % STAGES);")
        o("nq_cp_async_commit();")
        o("const uint8_t *sa = smem + (kt % STAGES) * (BM + BN) * LDS, *sb = sa + BM * LDS;")
        unroll(o, "ks", "2")
        o("uint32_t a[MT][4], b[NT][2];")
        o("/* A: lanes 0-15 give rows 0-15 at k 0, lanes 16-31 the same rows at k 16 (registers: rows g, g + 8 x k 0-15, 16-31) */")
        unroll(o, "i", "MT")
        o("nq_ldmatrix_x4(a[i], sa + (wm * MT * 16 + 16 * i + (lane & 15)) * LDS + ks * 32 + 16 * (lane >> 4));")
        o.close()
        o("/* B: two n tiles an instruction: lanes 0-7 columns 0-7 at k 0, 8-15 at k 16, 16-31 columns 8-15 */")
        unroll(o, "q", "NT / 2")
        o("uint32_t r[4];")
        o("nq_ldmatrix_x4(r, sb + (wn * NT * 8 + 16 * q + 8 * (lane >> 4) + (lane & 7)) * LDS + ks * 32 + 16 * ((lane >> 3) & 1));")
        o("b[2 * q][0] = r[0]; b[2 * q][1] = r[1]; b[2 * q + 1][0] = r[2]; b[2 * q + 1][1] = r[3];")
        o.close()
        if nt % 2:
            o("nq_ldmatrix_x2(b[NT - 1], sb + (wn * NT * 8 + 8 * (NT - 1) + (lane & 7)) * LDS + ks * 32 + 16 * ((lane >> 3) & 1));")
        unroll(o, "i", "MT", "q", "NT")
        o("nq_mma_u8s8(acc[i][q], a[i], b[q][0], b[q][1]);")
        o.close().close().close().close()
        o("nq_cp_async_wait<0>();")
        o("__syncthreads();  /* the stages are free: the output tile goes in their place */")
        o("/* requantize: lane holds columns 2t, 2t + 1 of rows g, g + 8 of each tile -> BM x BN bytes at LDC apart */")
        o("uint8_t *sc = smem;")
        unroll(o, "q", "NT")
        o("const int cl = wn * NT * 8 + 8 * q + 2 * t, col = col0 + cl;")
        o(f"const int32_t b0 = __ldg({B} + col), b1 = __ldg({B} + col + 1), m0 = __ldg({M} + col), "
          f"m1 = __ldg({M} + col + 1), s0 = __ldg({S} + col), s1 = __ldg({S} + col + 1);")
        unroll(o, "i", "MT", "j", "2")
        o("const int r = wm * MT * 16 + 16 * i + g + 8 * j;")
        o(f"sc[r * LDC + cl] = (uint8_t)({conv_t})nq_requantize((int64_t)b0 + acc[i][q][2 * j], m0, s0, {lo}, {hi});")
        o(f"sc[r * LDC + cl + 1] = (uint8_t)({conv_t})nq_requantize((int64_t)b1 + acc[i][q][2 * j + 1], m1, s1, {lo}, {hi});")
        o.close().close().close()
        o("__syncthreads();")
        piece = 16 if bn % 16 == 0 else 8   # bytes a store: uint4 or uint2
        vt, words = ("uint4", "xyzw") if piece == 16 else ("uint2", "xy")
        o(f"/* {piece}-byte stores: piece id = (row, {piece} channels) of the tile; channels-last, so each is {piece} "
          "contiguous bytes */")
        o.open(f"for (int id = tid; id < BM * (BN / {piece}); id += {MMA_THREADS})")
        o(f"const int r = id / (BN / {piece}), cp = id % (BN / {piece});")
        o("const long row = row0 + r;")
        o("if (row >= rows) continue;")
        o("const int img = (int)(row / OHW), pix = (int)(row % OHW);")
        o(f"const size_t at = (size_t)img * ARENA_BYTES + (size_t)pix * O + col0 + {piece} * cp;")
        o(f"{vt} v = *(const {vt} *)(sc + r * LDC + {piece} * cp);")
        if s.fused_add is not None:
            skip = self.buf(s.inputs[1])
            skip_t = "uint8_t" if skip.dtype == "uint8" else "int8_t"
            o(f"/* + the other input, residual add {s.fused_add[0].name}: its formula on {piece} channels (docs/NUMERICS.md) */")
            o(f"const {vt} sk = *(const {vt} *)(arena + at + {skip.offset});")
            o(f"uint32_t cw[{len(words)}] = {{{', '.join('v.' + f for f in words)}}};")
            o(f"const uint32_t sw[{len(words)}] = {{{', '.join('sk.' + f for f in words)}}};")
            unroll(o, "wd", str(len(words)))
            o("uint32_t word = 0;")
            unroll(o, "by", "4")
            o(f"const int32_t c = ({conv_t})(cw[wd] >> (8 * by)), x1 = ({skip_t})(sw[wd] >> (8 * by));")
            o(f"word |= (uint32_t)(uint8_t)({yout.ctype}){self.fused_add_value(s, 'c', 'x1')} << (8 * by);")
            o.close()
            o("cw[wd] = word;")
            o.close()
            o(f"v = make_{vt}({', '.join(f'cw[{i}]' for i in range(len(words)))});")
        o(f"*({vt} *)(arena + at + {yout.offset}) = v;")
        o.close()

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
                    upload=self.upload_constants(),
                    ptx=PTX_HELPERS if any(self.mma_eligible(st) for st in p.steps) else "")

    def launches(self, steps) -> str:
        """The kernel launches of ``steps`` for n images, one line each (indented for their function)."""
        o = Source()
        o.level = 1
        for s in steps:
            if self.mma_eligible(s):
                oc, oh, ow = self.hwc(self.buf(s.output).shape)
                tiles = f"nq_grid(n, {oh * ow}, {MMA_BM}) * {oc // self.mma_tiles(s)[0]}"   # row tiles x column tiles
                o(f"{self.fn_name(s)}<<<{tiles}, {MMA_THREADS}, 0, nq_stream>>>(d_arena, d_in, d_out, n);")
            else:
                o(f"{self.fn_name(s)}<<<nq_grid(n, {self.buf(s.output).elements}, {THREADS}), {THREADS}, 0, nq_stream>>>"
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
