"""The integer numerics (docs/NUMERICS.md): exact, tolerance 0 unless the spec says otherwise."""
import math

import numpy as np
import pytest
import torch

from netquant.quant import numerics as nx


def test_quantize_multiplier_worked_examples():
    assert nx.quantize_multiplier(0.5) == (2 ** 30, 31)
    assert nx.quantize_multiplier(0.0123) == (1690499128, 37)
    M, s = nx.quantize_multiplier(2.0 ** -9)  # a power of two is a pure shift
    assert (M, s) == (2 ** 30, 39)
    for m in (1e-12, 1e-6, 0.3, 0.999999999, 1.0, 3.7, 1000.0):
        M, s = nx.quantize_multiplier(m)
        assert 1 <= s <= nx.MAX_SHIFT and M < 2 ** 31
        assert abs(M * 2.0 ** -s - m) <= m * 2.0 ** -30 or s == nx.MAX_SHIFT
    with pytest.raises(ValueError, match="positive"):
        nx.quantize_multiplier(0.0)


def test_rounding_shift_is_half_up():
    v = torch.tensor([5, -5, 6, -6, 7, -7, 0, 1, -1], dtype=torch.int64)
    got = nx.rounding_shift(v.clone(), torch.tensor(1))
    assert got.tolist() == [3, -2, 3, -3, 4, -3, 0, 1, 0]  # 2.5 -> 3, -2.5 -> -2, 3.5 -> 4, -3.5 -> -3


def test_requantize_matches_exact_rational_rounding():
    rng = np.random.default_rng(0)
    acc = rng.integers(-2 ** 30, 2 ** 30, size=20000)
    for m in (0.0123, 3.1e-5, 0.75, 2.0 ** -12):
        M, s = nx.quantize_multiplier(m)
        got = nx.requantize(torch.from_numpy(acc.copy()), torch.tensor(M), torch.tensor(s), -2 ** 31, 2 ** 31 - 1)
        # exact: floor(acc * M / 2^s + 1/2) with Python integers
        want = [(int(a) * M + (1 << (s - 1))) >> s for a in acc[:500]]
        assert got[:500].tolist() == want
        # and within one step of rounding the true real product
        assert np.abs(got.numpy() - np.floor(acc * m + 0.5)).max() <= 1


def test_requantize_saturates():
    got = nx.requantize(torch.tensor([10 ** 6, -(10 ** 6), 100]), torch.tensor(2 ** 30), torch.tensor(31), 0, 255)
    assert got.tolist() == [255, 0, 50]


def test_quantize_input_is_float32_arithmetic():
    rng = np.random.default_rng(1)
    x = rng.normal(size=100000).astype(np.float32) * 3
    scale = 0.0171
    got = nx.quantize_input(torch.from_numpy(x), scale, -128, 127).numpy()
    inv = np.float32(1.0 / scale)
    want = np.clip(np.floor((x * inv).astype(np.float32) + np.float32(0.5)), -128, 127)
    assert np.array_equal(got, want)


def test_weight_and_bias_quantization():
    w = np.array([[0.5, -0.25, 0.127], [1.0, -1.0, 0.0]], dtype=np.float32)
    q = nx.quantize_weights(w, np.array([0.5 / 127, 1.0 / 127]))
    assert q.tolist() == [[127, -64, 32], [127, -127, 0]]  # -63.5 rounds away from zero
    b = nx.quantize_bias(np.array([0.1, -0.1]), np.array([0.001, 0.003]), "layer")
    assert b.tolist() == [100, -33]
    with pytest.raises(ValueError, match="layer: bias does not fit int32"):
        nx.quantize_bias(np.array([1e9]), np.array([1e-3]), "layer")


def test_accumulator_bound():
    wq = np.array([[127, -127], [1, 2]], dtype=np.int8)
    assert nx.accumulator_bound(wq, 255, np.array([10, -3])).tolist() == [255 * 254 + 10, 255 * 3 + 3]


def test_pow2_scale():
    assert nx.pow2_scale(0.003) == 2 ** -8 and nx.pow2_scale(0.25) == 0.25
    assert math.log2(nx.pow2_scale(1.3)) == 1
