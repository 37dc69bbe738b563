"""The x86 layouts of conv weights: what the C printer packs for the kernel it prints (the
shared Program holds the weights channels-last only, program.IntConvPlan).

======  ==========================================  =====================================
table   layout                                      kernel
======  ==========================================  =====================================
wv      int8 [KH][KW][I/4][O/16][16][4]             AVX-512 VNNI register tiles (vpdpbusd)
ww      int16 [KH][KW][I/2][O/8][8][2]              AVX2 register tiles (vpmaddwd)
wa      int8 [KH][J][O/16][16][64]                  AMX tiles (tdpbusd / tdpbssd)
wd      int16 [C/B][taps/2][2][B] (c_conv_dw.pack_dw)  depthwise, channels in vector lanes
======  ==========================================  =====================================
"""
from __future__ import annotations

import numpy as np

from ..quant import numerics as nx

LANES = 16  # int32 lanes of a 512-bit vector: output channels computed together by the VNNI kernel


def pack_vnni(w: np.ndarray) -> np.ndarray:
    """Conv weights (O, I, KH, KW) -> int8 [KH][KW][I/4][O/16][16][4], zero padded: one 64-byte
    row holds 4 input channels of 16 output channels, the operand of one vpdpbusd, and the rows
    one tap and 4 input channels need for all output channels lie side by side.
    Element [kh][kw][c4][ob][lane][j] is w[16*ob + lane, 4*c4 + j, kh, kw]."""
    o, i, kh, kw = w.shape
    ob, ip = -(-o // LANES), -(-i // 4) * 4
    padded = np.zeros((ob * LANES, ip, kh, kw), np.int8)
    padded[:o, :i] = w
    # (OB*16, I4*4, KH, KW) -> (OB, 16, I4, 4, KH, KW) -> (KH, KW, I4, OB, 16, 4)
    return np.ascontiguousarray(padded.reshape(ob, LANES, ip // 4, 4, kh, kw).transpose(4, 5, 2, 0, 1, 3))


def pack_avx2(w: np.ndarray) -> np.ndarray:
    """Conv weights (O, I, KH, KW) -> int16 [KH][KW][I/2][O/8][8][2], zero padded: one 32-byte
    row holds 2 input channels of 8 output channels, the operand of one vpmaddwd (AVX2).
    Element [kh][kw][c2][ob][lane][j] is w[8*ob + lane, 2*c2 + j, kh, kw]."""
    o, i, kh, kw = w.shape
    ob, ip = -(-o // 8), -(-i // 2) * 2
    padded = np.zeros((ob * 8, ip, kh, kw), np.int16)
    padded[:o, :i] = w
    # (OB*8, I2*2, KH, KW) -> (OB, 8, I2, 2, KH, KW) -> (KH, KW, I2, OB, 8, 2)
    return np.ascontiguousarray(padded.reshape(ob, 8, ip // 2, 2, kh, kw).transpose(4, 5, 2, 0, 1, 3))


SIGNED_OFFSET = -nx.INT8[0]  # 128: int8 x + 128 is the uint8 that vpdpbusd multiplies


def vnni_bias(bias: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The bias of the VNNI kernel over int8 input x, which it reads as u = x + 128 (the zero
    padding as u = 128): sum(u * w) = sum(x * w) + 128 * sum(w), so the bias takes back
    128 * sum(w) per output channel, exactly. Example: w = [1, 1, 2], x = [5, 0, -7]:
    sum(x * w) = -9; u = [133, 128, 121]: sum(u * w) = 503 = -9 + 128 * 4."""
    return (bias.astype(np.int64) - SIGNED_OFFSET * w.reshape(len(w), -1).sum(1, dtype=np.int64)).astype(np.int32)


AMX_K = 64      # bytes of k per AMX tile row: one tdpbusd multiplies 16 x 64 by 64 x 16


def pack_amx(w: np.ndarray) -> np.ndarray:
    """Conv weights (O, I, KH, KW) -> int8 [KH][J][NB][16][64], the right operands of AMX dot
    products. For one filter row kh the k axis is the KW*I bytes of KW adjacent channels-last
    input pixels, zero-padded to J*64; NB = ceil(O/16) blocks of 16 output channels. A 16 x 64
    tile row kq holds 4 consecutive k of 16 outputs: element [kh][j][nb][kq][4n + i] is the
    weight of output 16*nb + n at byte b = 64*j + 4*kq + i of the row, i.e. input channel b % I of
    tap kw = b // I. Example: I = 16, KW = 3: 48 bytes per filter row, J = 1, k 48..63 are 0."""
    o, i, kh, kw = w.shape
    j, nb = -(-kw * i // AMX_K), -(-o // LANES)
    rows = np.zeros((nb * LANES, kh, j * AMX_K), np.int8)
    rows[:o, :, :kw * i] = w.transpose(0, 2, 3, 1).reshape(o, kh, kw * i)   # (O, KH, KW*I), channels-last
    # (NB*16 n, KH, J*16 kq * 4 i) -> (NB, 16n, KH, J, 16kq, 4i) -> (KH, J, NB, 16kq, 16n, 4i)
    return np.ascontiguousarray(rows.reshape(nb, LANES, kh, j, 16, 4).transpose(2, 3, 0, 4, 1, 5))
