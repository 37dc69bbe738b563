"""4-bit weights (W4A8): which integer layers have them and how their codes are stored two per byte.

A conv or linear layer lowered with ``weight_bits`` <= 4 (:class:`~netquant.quant.config.QuantConfig`,
globally or per layer) has integer weights in -L..L, L = 2^(bits-1) - 1 (4 bits: -7..7, the
symmetric range; docs/NUMERICS.md, "4-bit weights"), held in int8 arrays by the QGraph so that
the reference executor and the fake-quant simulation run them unchanged; its QNode records
``attrs["weight_bits"]``. Wherever the weights are at rest (the quantizer file, the generated C
weights, the learnable-memory count) such a layer takes half a byte per weight: two's complement
nibbles, element 2i in the low nibble of byte i and element 2i+1 in the high one (ONNX's INT4
packing, so the same bytes are an ONNX int4 initializer). Example: codes [3, -2, 7] pack to
bytes [0xE3, 0x07] (3 = 0x3, -2 = 0xE; the odd last element pads with 0).
"""
from __future__ import annotations

import numpy as np

PACKED_BITS = 4   # weights of this many bits or fewer are stored two per byte
WEIGHT_OPS = ("conv", "linear")


def weight_bits(n) -> int:
    """The weight bits of an integer conv/linear QNode (8 when lowering recorded none)."""
    return int(n.attrs.get("weight_bits", 8))


def is_int4(n) -> bool:
    """Does QNode ``n`` hold weights stored two per byte (an integer conv or linear layer with at
    most 4 weight bits)?"""
    return bool(n.quantized and n.op in WEIGHT_OPS and weight_bits(n) <= PACKED_BITS)


def packed_size(count: int) -> int:
    """Bytes of ``count`` 4-bit codes: ceil(count / 2)."""
    return (int(count) + 1) // 2


def pack(codes: np.ndarray) -> np.ndarray:
    """Integer codes in -8..7 (any shape, read in C order) -> uint8 (ceil(n/2),), two per byte,
    element 2i in the low nibble. A value outside -8..7 is a ValueError (it has no nibble)."""
    flat = np.asarray(codes).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError(f"4-bit codes must lie in -8..7, got {int(flat.min())}..{int(flat.max())}")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int16)])
    nib = (flat & 0xF).astype(np.uint8)
    return np.ascontiguousarray(nib[0::2] | (nib[1::2] << 4))


def unpack(packed: np.ndarray, count: int) -> np.ndarray:
    """The inverse of :func:`pack`: the first ``count`` codes as int8 (sign-extended nibbles)."""
    p = np.asarray(packed, np.uint8).reshape(-1)
    if packed_size(count) != p.size:
        raise ValueError(f"{p.size} packed bytes hold {2 * p.size} codes, not {count}")
    nib = np.empty(2 * p.size, np.int16)
    nib[0::2], nib[1::2] = p & 0xF, p >> 4
    return ((nib ^ 8) - 8).astype(np.int8)[:count]
