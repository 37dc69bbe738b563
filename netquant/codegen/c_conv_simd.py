"""Register-tiled direct convolutions for the C target: one printer, two instruction sets.

A tile is OBT blocks of LANES output channels (one vector register each) for P adjacent output
pixels of one row: OBT * P int32 accumulators live in registers for the whole reduction. Per
filter tap and group of K input channels (the 32 bits one broadcast carries) the tile loads OBT
weight vectors, broadcasts the K input values of each of its P pixels and multiplies-accumulates
OBT * P times. The input is first copied into a padded (HP, WP, CP) per-thread buffer whose
border holds the padding value, so the tap loops have no bounds checks and every address is the
tile's base plus a constant; channels C..CP-1 meet zero weights.

=========  ======================================  ==========================================
profile    AVX-512 VNNI (``VNNI``)                  AVX2 (``AVX2``)
=========  ======================================  ==========================================
vector     16 int32 lanes (zmm, 32 registers)       8 int32 lanes (ymm, 16 registers)
K, staged  4 uint8 channels; int8 input read as     2 int16 channels, uint8 or int8 input
           x + 128 (x86_pack.vnni_bias)             widened (no offset)
product    vpdpbusd: 64 u8 x s8 MACs, accumulates   vpmaddwd + vpaddd: 16 s16 x s16 MACs
weights    "wv" [KH][KW][CP/4][OB][16][4] int8,     "ww" [KH][KW][CP/2][OB][8][2] int8 at
           in tile_order                            rest, sign-extended to int16 by the load
                                                    (vpmovsxbw), in tile_order (flat() for
                                                    the RGB stem)
tile       OBT <= 4, OBT * P <= 24                  OBT <= 2, OBT * P <= 10
=========  ======================================  ==========================================

Sums are exact int32 (lowering bounds |acc| < 2^31; vpmaddwd's pair sums of 8-bit values by
8-bit weights are far inside int32). The reduction of a tile is one asm statement (AT&T
syntax): compilers otherwise fold the constant weights into per-instruction memory operands,
hoist the broadcasts and spill accumulators. Inside it a loop runs over the CK groups of K input
channels (``unroll`` groups per iteration for 1x1 convs), each iteration every filter tap with
constant displacements from the tile's input and weight pointers, which then advance by K
channels and by one group of weights; the weights are stored in the order the tile reads them
(``tile_order``: one contiguous stream). Output channel blocks and pixel tiles are runtime
loops; each (group of OBT blocks, output row) pair is one item of the generated thread pool
(c_pool.py), the padded input copy one item per row, so one image splits across threads.
So the text of a conv is at most two tile widths x two block counts of KH*KW taps, whatever its
image size or channel count (ResNet-50's layer4 3x3 conv: 31 KB of source; it compiled to 2.9 MB
of code when every tile was unrolled). The epilogue is C with intrinsics: requantization
from the high half of the product where every shift allows it (netquant_rt.h), saturating packs
into whole-vector stores where the tile's bytes are contiguous.

Example: S1U1_conv1 (C = O = 16, 32x32, 3x3) on VNNI: OBT = 1, P = 16, two tiles per row, each
4 iterations over the channel groups of 9 taps x 16 vpdpbusd = 576 against 9 x 4 x 17 loads.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..quant.numerics import dtype_range
from .program import Step
from .x86_pack import SIGNED_OFFSET


L2_HALF_BYTES = 256 * 1024   # half the smallest L2 of the x86 cores this targets (Zen 3: 512 KB a core)


@dataclass(frozen=True)
class SimdIsa:
    """What the tile printer needs to know of one instruction set."""

    lanes: int           # int32 lanes per vector: output channels of one block
    k: int               # input channels per 32-bit broadcast
    elem: str            # C type of the staged input
    weights: str         # the Program constant with its weight layout
    vtype: str           # C vector type
    reg: str             # asm register prefix
    load: str            # aligned vector load
    max_obt: int         # output blocks per tile
    max_acc: int         # accumulators per tile
    w_regs: tuple        # registers of the weights of one tap and channel group
    x_regs: tuple        # registers of the broadcasts (alternating)
    t_regs: tuple        # registers of products before they are added (alternating), if any
    label: str           # how the report names it
    vec: str             # intrinsics prefix
    requant_hi: str      # netquant_rt.h: requantization from the high half of the product
    pack: str            # netquant_rt.h: four vectors -> saturated bytes (_u8 / _s8)

    def macs(self, w: int, x: int, acc: str, t: int) -> list:
        """asm lines: accumulator ``acc`` (an operand) += weights register w . broadcast register x."""
        r = self.reg
        if self.t_regs:
            return [f"vpmaddwd %%{r}{w}, %%{r}{x}, %%{r}{t}", f"vpaddd %%{r}{t}, {acc}, {acc}"]
        return [f"vpdpbusd %%{r}{w}, %%{r}{x}, {acc}"]

    @property
    def wbytes(self) -> int:
        """Bytes of one weight vector as stored (codegen/int4.py stores 4-bit ones packed)."""
        return 4 * self.lanes

    def wname(self, name: str) -> str:
        """The C name of the weight table ``name`` the tile reads."""
        return name

    def wload(self, off: int, reg: int) -> list:
        """asm lines: the weight vector at byte ``off`` from the weight pointer into register ``reg``."""
        return [f"{self.load} {off}(%[w]), %%{self.reg}{reg}"]

    def wsetup(self) -> tuple[list, str]:
        """(C lines before a tile's asm statement, its extra input operands) that ``wload`` needs."""
        return [], ""

    @property
    def clobbers(self) -> list:
        return [f"xmm{r}" for r in sorted(self.w_regs + self.x_regs + self.t_regs)]


@dataclass(frozen=True)
class WidenedIsa(SimdIsa):
    """AVX2's weights: int8 at rest (one byte a weight, as every other path stores them: the
    sources of ResNet-50 are 51 MB with int16 tables against 35 MB), sign-extended to the int16
    lanes vpmaddwd multiplies by the load itself: ``vpmovsxbw 16 bytes -> 16 words``, which
    replaces the plain vector load, so the tile's instruction count is unchanged. Example: byte
    0xF9 (-7) becomes word 0xFFF9 (-7)."""

    @property
    def wbytes(self) -> int:
        return 2 * self.lanes   # 8 lanes x 2 input channels, one byte each

    def wload(self, off: int, reg: int) -> list:
        return [f"vpmovsxbw {off}(%[w]), %%{self.reg}{reg}"]


VNNI = SimdIsa(16, 4, "uint8_t", "wv", "__m512i", "zmm", "vmovdqa64", 4, 24,
              (31, 30, 29, 28), (27, 26), (), "AVX-512 VNNI", "_mm512", "nq_requantize16_hi", "nq_pack4")
AVX2 = WidenedIsa(8, 2, "int16_t", "ww", "__m256i", "ymm", "vmovdqa", 2, 10,
              (15, 14), (13, 12), (11, 10), "AVX2", "_mm256", "nq_requantize8_hi", "nq_pack4x8")


def tile_order(w: np.ndarray, obt: int) -> np.ndarray:
    """Program weights ``w`` [KH][KW][CK][OB][LANES][K] ("wv", "ww") -> the order one tile reads
    them, flat: [NBG][CK][KH*KW][nb][LANES][K], NBG groups of OBT output blocks (the last of
    OB % OBT where that is not 0). A tile's reduction then streams one contiguous run of
    weights (the program order strides by OB blocks per channel group: on a 512-channel conv
    every 2 KB, all of a tap's weights in two sets of a 64-set L1). Example: KH = KW = 1, CK = 1,
    OB = 3, obt = 2: blocks 0, 1 then block 2."""
    kh, kw, ck, ob = w.shape[:4]
    t = w.reshape(kh * kw, ck, ob, -1).transpose(2, 1, 0, 3)            # [OB][CK][T][LANES*K]
    parts = [t[b0:b0 + obt].transpose(1, 2, 0, 3).ravel() for b0 in range(0, ob, obt)]
    return np.concatenate(parts)


def tile_weight_index(shape: tuple, obt: int, tap: str = "(kh * KW + kw)", k: str = "k") -> str:
    """C expression: the offset of weight (o, tap, k) in tile_order(w of ``shape``, obt) (``k``:
    the input channel or flat value, ``tap``: the filter tap, C expressions). Groups before o's
    are all whole (OBT blocks)."""
    kh, kw, ck, ob, lanes, kk = shape
    rest = ob % obt
    nb = f"(o / {lanes} / {obt} < {ob // obt} ? {obt} : {rest})" if rest else str(obt)
    return (f"((((o / {lanes} / {obt}) * {obt * ck} + {k} / {kk} * {nb}) * {kh * kw} + {tap} * {nb} "
            f"+ o / {lanes} % {obt}) * {lanes} + o % {lanes}) * {kk} + {k} % {kk}")


class SimdConv:
    """Prints the ``isa`` kernel of a conv step for a CPrinter ``pr`` (buffers, constant names)."""

    def __init__(self, pr, isa: SimdIsa):
        self.pr = pr
        self.isa = isa

    def geometry(self, s: Step) -> dict:
        """Shapes of the kernel of ``s``. CP: input channels padded to a multiple of K; HP, WP:
        the padded input it reads (the input itself when nothing needs padding or widening); OB:
        blocks of LANES output channels; OBT blocks and P pixels per tile; ZP: the padding value."""
        isa, a = self.isa, s.node.attrs
        c, h, w = self.pr.hwc(self.pr.buf(s.inputs[0]).shape)
        oc, oh, ow = self.pr.hwc(self.pr.buf(s.output).shape)
        o_, i_, kh, kw = np.shape(s.node.params["weight"])   # (O, I, KH, KW): x86_pack's [KH][KW][CK][OB]...
        ck, ob = -(-i_ // isa.k), -(-o_ // isa.lanes)
        ph, pw = a["padding"]
        signed = self.pr.buf(s.inputs[0]).dtype == "int8"
        staged = int(bool(ph or pw or c % isa.k or isa.elem != "uint8_t" or signed))
        obt = min(ob, isa.max_obt)
        flat = self.flat(kw, c, a["dilation"][1])
        if flat:   # the taps of a filter row and the channels as one reduction: see flat()
            kw, ck = 1, -(-kw * c // isa.k)
        return dict(C=c, H=h, W=w, O=oc, OH=oh, OW=ow, KH=kh, KW=kw, CP=c if flat else isa.k * ck, CK=ck, OB=ob,
                    FLAT=int(flat),
                    SH=a["stride"][0], SW=a["stride"][1], PH=ph, PW=pw, DH=a["dilation"][0], DW=a["dilation"][1],
                    HP=h + 2 * ph if staged else h, WP=w + 2 * pw if staged else w, STAGED=staged,
                    ZP=SIGNED_OFFSET if signed and isa.reg == VNNI.reg else 0, OBT=obt, NBG=-(-ob // obt),
                    P=max(1, min(ow, self.max_acc(s) // obt)))

    # Accumulators of an AVX-512 tile whose epilogue also computes a residual add: its requant
    # constants, the add's multiplier pieces and the other input's values then stay in registers
    # (24 accumulators spilled them; ResNet-50 on a Zen 4 core, interleaved A/B: +2.4% and +3.6%
    # an image with 16, +1.3% with 20).
    FUSED_ADD_MAX_ACC = 16

    def max_acc(self, s: Step) -> int:
        """Accumulators a tile of ``s`` may hold: the profile's, fewer under a fused add's epilogue (AVX-512)."""
        if s.fused_add is not None and self.isa.reg == VNNI.reg:
            return min(self.isa.max_acc, self.FUSED_ADD_MAX_ACC)
        return self.isa.max_acc

    def flat(self, kw: int, c: int, dw: int) -> bool:
        """Whether a conv reduces over the KW taps of a filter row and its C channels as one run
        of KW * C values (the "flat" form): the input is staged without channel padding, each
        staged row one array of WP * C values, so the values of taps kw..kw+1 of output pixel ow
        are adjacent: KH taps of ceil(KW * C / K) groups instead of KH * KW taps of ceil(C / K).
        For the strided 7x7 stem over RGB (C = 3) on AVX2 (K = 2): 7 x 11 vpmaddwd per pixel
        and block instead of 7 x 7 x 2 (the channel padded to 4: a third of the work on zeros).
        On AVX-512 VNNI (K = 4) the same stem is 7 x 6 vpdpbusd against 7 x 7 (ResNet-18's
        stem, 9% of its time, went from 777 to 648 us an image on a Zen 4 core). The last group
        reads up to K - 1 values past the window, met by zero weights."""
        groups = -(-kw * c // self.isa.k)
        return kw > 1 and dw == 1 and c % self.isa.k != 0 and groups < kw * -(-c // self.isa.k)

    def packed_weights(self, s: Step, w: np.ndarray) -> np.ndarray:
        """The weights of ``s`` in the order its tiles read them (tile_order), from ``w`` in the
        x86 layout (x86_pack.pack_vnni / pack_avx2), or for the flat form (flat()) from the conv's int8 weights (O, I, KH, KW):
        [KH][1][J][OB][LANES][K] with value e = j * K + k of filter row kh being channel e % C of
        tap e // C (0 past KW * C)."""
        g, isa = self.geometry(s), self.isa
        if g["FLAT"]:
            wq = np.asarray(s.node.params["weight"])
            o, c, kh, kw = wq.shape
            e = np.arange(g["CK"] * isa.k)
            rows = np.zeros((g["OB"] * isa.lanes, kh, e.size), w.dtype)
            rows[:o, :, e < kw * c] = wq[:, e[e < kw * c] % c, :, e[e < kw * c] // c].transpose(1, 2, 0)
            # (OB*LANES, KH, J*K) -> [KH][1][J][OB][LANES][K]
            w = rows.reshape(g["OB"], isa.lanes, kh, 1, g["CK"], isa.k).transpose(2, 3, 4, 0, 1, 5)
        return tile_order(np.ascontiguousarray(w), g["OBT"])

    def weight_index(self, s: Step) -> str:
        """C expression: the offset of weight (o, kh, kw, k) in packed_weights(s)."""
        g = self.geometry(s)
        shape = (g["KH"], g["KW"], g["CK"], g["OB"], self.isa.lanes, self.isa.k)
        if g["FLAT"]:
            return tile_weight_index(shape, g["OBT"], tap="kh", k="(kw * C + k)")
        return tile_weight_index(shape, g["OBT"])

    @staticmethod
    def widths(g: dict) -> list:
        """[(pixels per tile, tiles)] covering one output row in as few tiles of at most P
        pixels as it takes, as even as possible. Example: OW = 32, P = 14: 2 x 11 and 1 x 10."""
        n = -(-g["OW"] // g["P"])
        base, rem = divmod(g["OW"], n)
        return [(w, c) for w, c in ((base + 1, rem), (base, n - rem)) if c]

    def staged_bytes(self, s: Step) -> int:
        g = self.geometry(s)
        # flat: the last group's reads past a window, K values past the buffer at most
        return (g["HP"] * g["WP"] * g["CP"] + self.isa.k) * (2 if self.isa.elem == "int16_t" else 1) if g["STAGED"] else 0

    def label(self, s: Step) -> str:
        g = self.geometry(s)
        tiles = " and ".join(f"{self.isa.lanes * g['OBT']} channels x {w} pixels" for w, _ in self.widths(g))
        return f"{self.isa.label} ({tiles} in registers)"

    def unroll(self, g: dict) -> int:
        """Channel groups per iteration of the reduction loop: more where a tap loop body is short
        (1x1 convs), so the loop's own instructions stay a small share."""
        return next((u for u in (4, 2) if g["CK"] % u == 0 and g["KH"] * g["KW"] * u <= 9), 1)

    def blocks_outer(self, g: dict) -> bool:
        """Whether the tile loops run over output-channel block groups outside rows: the order that
        streams less through the caches. Rows outside read every weight once per output row
        (OH * weight bytes); block groups outside read the padded input once per group of OBT
        blocks (NBG * input bytes). Example: ResNet-18's layer4 3x3 conv (7x7 output, 512
        channels, int16 weights 4.7 MB, padded input 83 KB): rows outside stream 33 MB per image
        through an L2 of 512 KB, block groups outside 2.7 MB. A 1x1 conv whose weights fit in
        L2_HALF_BYTES keeps rows outside whatever the sums say: its weights are then re-read from
        the L2, and a row item writes whole output pixels (and reads whole pixels of a fused add's
        other input) instead of a 64-byte slice of each per pass (ResNet-50 on a Zen 4 core, rows
        outside for every 1x1 conv: +1.1% and +2.0% an image in two interleaved A/B runs)."""
        esize = 2 if self.isa.elem == "int16_t" else 1
        weights = g["KH"] * g["KW"] * g["CP"] * g["OB"] * self.isa.lanes * esize
        if g["KH"] * g["KW"] == 1 and weights <= L2_HALF_BYTES:
            return False
        staged = g["HP"] * g["WP"] * g["CP"] * esize
        return g["NBG"] * staged <= g["OH"] * weights

    def prelude(self, s: Step, o):
        """File-scope functions of the kernel of ``s``, run by nq_run (c_pool.py) one item at a
        time: ``<step>_stage`` copies padded input row ``hp`` (when the input needs padding or
        widening), ``<step>_tiles`` the register tiles of one (block group, output row) pair. A
        7x7 output of 512 channels is then 32 x 7 items, split evenly however many threads
        are awake. Blocks of OBT output channels and pixel tiles are runtime loops, so the text
        is a few tile bodies per conv whatever its spatial size or channel count."""
        g = self.geometry(s)
        fn, e = self.pr.fn_name(s), self.isa.elem
        xin, yt = self.pr.buf(s.inputs[0]).ctype, self.pr.buf(s.output).ctype
        enum = "enum { " + ", ".join(f"{k} = {v}" for k, v in g.items()) + " };"
        skip = f" const {self.pr.buf(s.inputs[1]).ctype} *x1;" if s.fused_add else ""   # the fused add's other input
        o(f"typedef struct {{ const {xin} *x0; {yt} *y; {e} *xs;{skip} }} {fn}_ctx;")
        if g["STAGED"]:
            o.open(f"static void {fn}_stage(void *arg, int hp)")
            o(f"const {fn}_ctx *c = arg;")
            o(enum)
            o(f"const {xin} *restrict x0 = c->x0;")
            self.stage(s, o, g)
            o.close()
        o.open(f"static void {fn}_tiles(void *arg, int item)")
        o(f"const {fn}_ctx *c = arg;")
        o(enum)
        o(f"{yt} *restrict y = c->y;")
        if s.fused_add:
            o(f"const {self.pr.buf(s.inputs[1]).ctype} *restrict x1 = c->x1;")
        if g["STAGED"]:
            o(f"const {e} *xp = c->xs;")
        else:
            o("const uint8_t *xp = (const uint8_t *)c->x0;  /* no padding to add: read the input as it is */")
        if self.blocks_outer(g):
            o("const int bg = item / OH, oh = item % OH;")
        else:
            o("const int oh = item / NBG, bg = item % NBG;")
        o("const int b0 = bg * OBT;")
        full, rest = g["OB"] // g["OBT"], g["OB"] % g["OBT"]
        start = 0
        for width, count in self.widths(g):
            o.open(f"for (int ow0 = {start}; ow0 < {start + width * count}; ow0 += {width})")
            if not rest:
                self.tile(s, o, g, width, "b0", g["OBT"])
            elif not full:
                self.tile(s, o, g, width, "b0", rest)
            else:
                o.open(f"if (bg < {full})")
                self.tile(s, o, g, width, "b0", g["OBT"])
                o.close(" else {")
                o.level += 1
                self.tile(s, o, g, width, "b0", rest)
                o.close()
            o.close()
            start += width * count
        o.close()

    def print(self, s: Step, o):
        """The body of the step function of ``s``: the padded input staged (rows split across
        threads), then the tiles (items split across threads), each by nq_run."""
        g = self.geometry(s)
        fn, e = self.pr.fn_name(s), self.isa.elem
        macs = self.pr.conv_macs(s)
        xs = f"({e} *)nq_vpad" if g["STAGED"] else "NULL"
        o(f"{fn}_ctx ctx = {{x0, y, {xs}{', x1' if s.fused_add else ''}}};  "
          "/* nq_vpad: the calling thread's buffer, shared by the helpers */")
        if g["STAGED"]:
            o(f"nq_run({fn}_stage, &ctx, {g['HP']}, {macs}L);")
        o(f"nq_run({fn}_tiles, &ctx, {g['NBG'] * g['OH']}, {macs}L);")

    def stage(self, s: Step, o, g: dict):
        """Padded input row ``hp`` into ``c->xs`` (nq_vpad): the padding border and channels
        C..CP-1; int8 to uint8 as x + 128 (VNNI), or 8-bit values widened to int16 (AVX2)."""
        e = self.isa.elem
        xin = self.pr.buf(s.inputs[0]).ctype
        o(f"{e} *row = c->xs + hp * WP * CP;")
        o("const int h = hp - PH;")
        o.open("if (h < 0 || h >= H)")
        o(f"for (int i = 0; i < WP * CP; ++i) row[i] = ZP;  /* a padding row */")
        o("return;")
        o.close()
        o(f"const {xin} *src = x0 + h * W * C;")
        o(f"for (int i = 0; i < PW * CP; ++i) row[i] = row[(PW + W) * CP + i] = ZP;")
        if g["C"] == g["CP"] and e == xin:
            o("memcpy(row + PW * CP, src, W * C);")
        elif g["ZP"] == SIGNED_OFFSET:
            o("for (int w = 0; w < W; ++w) for (int c = 0; c < CP; ++c)  /* int8 x -> x + 128 */")
            o(f"    row[(PW + w) * CP + c] = c < C ? (uint8_t)(src[w * C + c] ^ 0x80) : ZP;")
        elif g["C"] == g["CP"]:
            o(f"for (int i = 0; i < W * C; ++i) row[PW * CP + i] = ({e})src[i];  /* widened */")
        else:
            o("for (int w = 0; w < W; ++w) for (int c = 0; c < CP; ++c)")
            o(f"    row[(PW + w) * CP + c] = c < C ? ({e})src[w * C + c] : 0;")

    def tile(self, s: Step, o, g: dict, npix: int, b0: str, nb: int):
        """One register tile: output blocks b0 .. b0+nb-1 (``b0`` a C expression) of pixels
        (oh, ow0 .. ow0+npix-1). One asm statement: the bias into the accumulators, then a loop
        over the CK groups of K input channels (unrolled by ``unroll``), each iteration every
        filter tap with constant displacements from the tile's input and weight pointers."""
        isa = self.isa
        esize = 2 if isa.elem == "int16_t" else 1
        vbytes = 4 * isa.lanes
        WT = isa.wname(self.pr.const_name(s, isa.weights))
        B = self.pr.const_name(s, "biasx" if isa.reg == VNNI.reg and s.plan.signed_input else "biasv")
        acc = [[f"a{b}_{p}" for p in range(npix)] for b in range(nb)]
        operand = {v: i for i, v in enumerate(v for row in acc for v in row)}
        u = self.unroll(g)
        o.open()
        o(f"const {isa.elem} *xt = xp + (oh * SH * WP + ow0 * SW) * CP;")
        taps = g["KH"] * g["KW"]
        o(f"const char *wt = (const char *){WT} + ({b0}) * {g['CK'] * taps * isa.wbytes};  /* tile_order */")
        o(f"const int32_t *bt = {B} + ({b0}) * {isa.lanes};")
        o(f"const char *wend = wt + {g['CK'] * taps * nb * isa.wbytes};  /* the weights past the last channel group */")
        o(f"{isa.vtype} {', '.join(operand)};")
        setup, inputs = isa.wsetup()
        for line in setup:
            o(line)
        o("__asm__(")
        o.level += 1
        for b in range(nb):
            for p in range(npix):
                o(f'"{isa.load} {vbytes * b}(%[b]), %{operand[acc[b][p]]}\\n\\t"  /* the bias */')
        o('"1:\\n\\t"')
        k = 0
        for j in range(u):
            for kh in range(g["KH"]):
                for kw in range(g["KW"]):
                    xk = (kh * g["DH"] * g["WP"] + kw * g["DW"]) * g["CP"]
                    wk = (j * taps + kh * g["KW"] + kw) * nb
                    o(f"/* tap ({kh}, {kw}), channels {isa.k * j}..{isa.k * j + isa.k - 1} of the group */")
                    for b in range(nb):
                        for line in isa.wload((wk + b) * isa.wbytes, isa.w_regs[b]):
                            o(f'"{line}\\n\\t"')
                    for p in range(npix):
                        x = isa.x_regs[p % 2]
                        off = (xk + p * g["SW"] * g["CP"] + isa.k * j) * esize
                        o(f'"vpbroadcastd {off}(%[x]), %%{isa.reg}{x}\\n\\t"')
                        for b in range(nb):
                            t = isa.t_regs[k % 2] if isa.t_regs else 0
                            k += 1
                            for line in isa.macs(isa.w_regs[b], x, f"%{operand[acc[b][p]]}", t):
                                o(f'"{line}\\n\\t"')
        o(f'"add ${isa.k * u * esize}, %[x]\\n\\t"')
        o(f'"add ${u * taps * nb * isa.wbytes}, %[w]\\n\\t"')
        o('"cmp %[e], %[w]\\n\\t"')
        o('"jne 1b\\n\\t"')
        # at most 30 operands: 24 accumulators, x and w (read and written: 2 each), b and e
        o(": " + ", ".join(f'"=&v"({v})' for v in operand) + ', [x] "+r"(xt), [w] "+r"(wt)')
        o(f': [b] "r"(bt), [e] "r"(wend){inputs}')
        o(": " + ", ".join(f'"{c}"' for c in isa.clobbers) + ', "cc", "memory");')
        o.level -= 1
        self.epilogue(s, o, g, acc, b0, nb)
        o.close()

    def _tables(self, s: Step, o, b0: str, nb: int, load: str, vtype: str):
        """Per block b: m<b> (multipliers) and, for the high-half requantization, r<b> / t<b>."""
        pr, lanes = self.pr, self.isa.lanes
        M = pr.const_name(s, "multv")
        for b in range(nb):
            off = f"{lanes} * ({b0} + {b})"
            if s.plan.hi_requant:
                o(f"const {vtype} m{b} = {load}((const void *)({M} + {off})), "
                  f"r{b} = {load}((const void *)({pr.const_name(s, 'rqv')} + {off})), "
                  f"t{b} = {load}((const void *)({pr.const_name(s, 'tv')} + {off}));")
            else:
                o(f"const {vtype} m{b} = {load}((const void *)({M} + {off})), "
                  f"t{b} = {load}((const void *)({pr.const_name(s, 'shiftv')} + {off}));")

    def fused_add(self, s: Step, conv: str, at: str, clamp: bool = True) -> str:
        """The residual add fused into conv ``s`` (c.py fuse_adds) on the lanes of vector ``conv``
        (the conv's requantized, clamped outputs): the other input's lanes loaded at ``at``, the
        add's formula, its clamp unless ``clamp`` is False (a saturating pack to the output type is
        the clamp then). In two 16-bit pieces where the multipliers allow (c.add_pieces16):
        nq_add16_dp on pairs from nq_pairs16 (AVX-512 VNNI), nq_add8_dp (AVX2); else the 15-bit
        pieces of nq_add16_pairs / nq_add8_pairs."""
        add, _ = s.fused_add
        v, L = self.isa.vec, self.isa.lanes
        signed = self.pr.buf(s.inputs[1]).dtype == "int8"
        shift = int(add.params["shift"][0])
        widen = f"{v}_cvtep{'i' if signed else 'u'}8_epi32"
        load = (f"_mm_loadu_si128((const __m128i *)({at}))" if L == 16 else f"_mm_loadl_epi64((const __m128i *)({at}))")
        if self.pr.add_pieces16_for(s) is None:
            fn = "nq_add16_pairs" if L == 16 else "nq_add8_pairs"
            q = f"{fn}({conv}, {widen}({load}), alu, auu, ahu, {shift})"
        elif L == 16:
            q = f"nq_add16_dp(nq_pairs16({conv}, {at}, {int(signed)}), ap0, ap1, {shift})"
        else:
            q = f"nq_add8_dp(_mm256_blend_epi16({conv}, _mm256_slli_epi32({widen}({load}), 16), 0xAA), ap0, ap1, {shift})"
        if not clamp:
            return q
        alo, ahi = add.attrs["clamp"]
        return f"{v}_min_epi32({v}_max_epi32({q}, {v}_set1_epi32({alo})), {v}_set1_epi32({ahi}))"

    def epilogue(self, s: Step, o, g: dict, acc: list, b0: str, nb: int):
        """Requantize a tile and store it. Where the bytes of four of its vectors are contiguous (O
        a multiple of LANES, and the tile spans every output channel or holds four blocks of each
        pixel), they are packed (saturating, which is the clamp where it is the output type's
        range) into one whole-vector store, a last group of fewer into a shorter one; AVX2 packs
        the two blocks of a pixel into 16 bytes. Otherwise each vector stores its lanes apart, the
        channels past O left out. Where some shift is outside HI_SHIFTS,
        VNNI requantizes in 64-bit lanes (nq_requantize16) and AVX2 lane by lane in scalar C."""
        isa, v = self.isa, self.isa.vec
        lo, hi = s.node.attrs["clamp"]
        out_t = self.pr.buf(s.output).dtype
        yt = self.pr.buf(s.output).ctype
        L = isa.lanes
        pixels = [(p, b, acc[b][p]) for p in range(len(acc[0])) for b in range(nb)]
        def at(base: str, p: int, b: int) -> str:   # pixel p, channel block b of an (OH, OW, O) tensor
            return f"{base} + (oh * OW + ow0 + {p}) * O + {L} * ({b0} + {b})"

        dst = {(p, b): at("y", p, b) for p, b, _ in pixels}
        # channels of block b that exist (O - L * (b0 + b), at most L)
        count = {b: f"(O - {L} * ({b0} + {b}) < {L} ? O - {L} * ({b0} + {b}) : {L})" for b in range(nb)}
        if g["O"] % L == 0:
            count = {b: str(L) for b in range(nb)}
        if not s.plan.hi_requant and isa.reg == AVX2.reg:
            M, S = self.pr.const_name(s, "mult"), self.pr.const_name(s, "shift")
            o("int32_t lane[8];")
            for p, b, a in pixels:
                c0 = f"{L} * ({b0} + {b})"
                o(f"_mm256_storeu_si256((__m256i *)lane, {a});")
                o(f"for (int l = 0; l < {count[b]}; ++l) ({dst[p, b]})[l] = "
                  f"({yt})nq_requantize(lane[l], {M}[{c0} + l], {S}[{c0} + l], {lo}, {hi});")
            return
        self._tables(s, o, b0, nb, f"{v}_load_si{32 * L}", isa.vtype)
        # packed stores: groups of four vectors in `pixels` order are 64 (VNNI) or 32 (AVX2)
        # contiguous bytes where the tile spans every output channel or holds four blocks of each
        # pixel; AVX2's two blocks of a pixel are 16 (a pack of two vectors: 3 instructions
        # against 2 x 5 with their clamps where each vector is stored apart)
        per_store = 4 if nb == g["OB"] or nb % 4 == 0 else 2 if L == 8 and nb == 2 else 0
        contiguous = g["O"] % L == 0 and per_store > 0
        last_clamp = (s.fused_add[0].attrs["clamp"] if s.fused_add else (lo, hi)) != dtype_range(out_t) or not contiguous
        clamp = (lo, hi) != dtype_range(out_t) or not contiguous
        if s.fused_add:   # the conv's own clamp first (its output type is not the store's), then the add's
            clamp = True
            pieces, names = self.pr.add_pieces16_for(s), ("ap0", "ap1")
            if pieces is None:
                pieces, names = self.pr.add_pieces_for(s), ("alu", "auu", "ahu")
            o(f"const {isa.vtype} " + ", ".join(f"{n} = {v}_set1_epi32({p})" for n, p in zip(names, pieces))
              + ";  /* the fused add's multiplier pieces, (conv, other input) int16 pairs */")
        for p, b, a in pixels:
            if s.plan.hi_requant:
                q = f"{isa.requant_hi}({a}, m{b}, r{b}, t{b})"
                if clamp:
                    q = f"{v}_min_epi32({v}_max_epi32({q}, {v}_set1_epi32({lo})), {v}_set1_epi32({hi}))"
            else:
                q = f"nq_requantize16({a}, m{b}, t{b}, {lo}, {hi})"
            o(f"{a} = {q};")
            if s.fused_add:   # the other input: the same position
                o(f"{a} = {self.fused_add(s, a, at('x1', p, b), last_clamp)};")
        if not contiguous:
            for p, b, a in pixels:
                if isa.reg == VNNI.reg:
                    mask = "0xffff" if g["O"] % L == 0 else f"(1u << {count[b]}) - 1"
                    o(f"_mm512_mask_cvtepi32_storeu_epi8({dst[p, b]}, (__mmask16)({mask}), {a});"
                      "  /* in range already: the low byte */")
                elif g["O"] % L == 0:
                    o(f"_mm_storel_epi64((__m128i *)({dst[p, b]}), _mm256_castsi256_si128(_mm256_permutevar8x32_epi32("
                      f"_mm256_pack{'us' if out_t == 'uint8' else 's'}_epi16(_mm256_packs_epi32({a}, {a}), _mm256_setzero_si256()), "
                      f"_mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))));  /* in range already: the 8 low bytes */")
                else:
                    o("{ int32_t lane[8];")
                    o(f"  _mm256_storeu_si256((__m256i *)lane, {a});")
                    o(f"  for (int l = 0; l < {count[b]}; ++l) ({dst[p, b]})[l] = ({yt})lane[l]; }}  /* in range already */")
            return
        pack = f"{isa.pack}_{'u8' if out_t == 'uint8' else 's8'}"
        if per_store == 2:   # AVX2, two blocks a pixel: 16 bytes of the pack of four
            zero = "_mm256_setzero_si256()"
            for i in range(0, len(pixels), 2):
                o(f"_mm_storeu_si128((__m128i *)({dst[pixels[i][:2]]}), _mm256_castsi256_si128("
                  f"{pack}({pixels[i][2]}, {pixels[i + 1][2]}, {zero}, {zero})));")
            return
        for i in range(0, len(pixels), 4):
            group = [a for _, _, a in pixels[i:i + 4]]
            at = dst[pixels[i][:2]]
            vec = f"{pack}({', '.join(group + [f'{v}_setzero_si{32 * L}()'] * (4 - len(group)))})"
            if len(group) == 4:
                o(f"{v}_storeu_si{32 * L}((void *)({at}), {vec});")
            elif isa.reg == VNNI.reg:
                o(f"_mm512_mask_storeu_epi8({at}, {hex((1 << (16 * len(group))) - 1)}ULL, {vec});")
            else:  # 8, 16 or 24 bytes of the packed vector
                o(f"const __m256i q{i} = {vec};")
                if len(group) >= 2:
                    o(f"_mm_storeu_si128((__m128i *)({at}), _mm256_castsi256_si128(q{i}));")
                if len(group) != 2:
                    half = f"_mm256_castsi256_si128(q{i})" if len(group) == 1 else f"_mm256_extracti128_si256(q{i}, 1)"
                    o(f"_mm_storel_epi64((__m128i *)({at} + {16 if len(group) == 3 else 0}), {half});")
