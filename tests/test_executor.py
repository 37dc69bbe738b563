"""The integer reference executor on its own: exact accumulation over several float32 chunks
(``k_chunks``) against int64 numpy, and runs from several threads at once (the app runs jobs in
threads) that give the serial integers and leave the process-wide torch flags as they were."""
import threading

import numpy as np
import pytest
import torch

from netquant.data.transforms import to_float
from netquant.quant import numerics as nx
from netquant.quant.lower import k_chunks
from netquant.quant.qgraph import QGraph, QNode
from netquant.ref.executor import _ieee_fp32, run_int8

# output = the accumulator itself: (acc * 2^30 + 2^29) >> 30 == acc, no clamp inside int32
IDENTITY = {"multiplier": 1 << 30, "shift": 30}
INT32 = (-(1 << 31), (1 << 31) - 1)


def _graph(layer: QNode, in_shape: tuple) -> QGraph:
    """input (float holding the integers 0..255) -> ``layer``: the layer reads the integers as given."""
    return QGraph((QNode("x", "input", (), in_shape, False), layer), layer.name, "x")


def _identity_params(o: int) -> dict:
    return {"multiplier": np.full(o, IDENTITY["multiplier"], np.int32), "shift": np.full(o, IDENTITY["shift"], np.int32)}


def _big_sums(rng, o: int, k: int) -> tuple:
    """Weights of +-127 (channel 0 all +127) and inputs of 200..255: per output channel the
    products sum to up to 255 * 127 * k, beyond 2^24 for k > 518."""
    w = np.where(rng.random((o, k)) < 0.9, 127, -127).astype(np.int8)
    w[0] = 127
    return w


def test_conv_over_several_chunks_equals_int64():
    """A 3x3 conv over 128 channels of inputs near 255 and weights of 127: the sums reach
    255 * 127 * 1152 = 37.3M > 2^24 = 16.8M, so k_chunks splits the 128 input channels into 3
    chunks; every output equals the int64 numpy sum, bit for bit (one float32 conv over all 1152
    products is off in the low bits: checked below, so the chunks are what makes it exact)."""
    rng = np.random.default_rng(0)
    o, c, hw = 4, 128, 6
    w = _big_sums(rng, o, c * 9).reshape(o, c, 3, 3)
    chunks = k_chunks(w, 255)
    assert len(chunks) == 3 and chunks[0][0] == 0 and chunks[-1][1] == c * 9, chunks
    bias = rng.integers(-1000, 1000, o).astype(np.int32)
    conv = QNode("conv", "conv", ("x",), (o, hw, hw), True, 1.0, "int8",
                 {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1, "clamp": INT32,
                  "k_chunks": chunks},
                 {"weight": w, "bias": bias, **_identity_params(o)})
    x = rng.integers(200, 256, (2, c, hw, hw))
    got = run_int8(_graph(conv, (c, hw, hw)), torch.from_numpy(x.astype(np.float32)), keep=())["conv"].numpy()
    # int64 reference: sum over input channels and taps of x * w, plus the bias
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.zeros((2, o, hw, hw), np.int64)
    for i in range(3):
        for j in range(3):
            want += np.einsum("nihw,oi->nohw", xp[:, :, i:i + hw, j:j + hw], w[:, :, i, j].astype(np.int64))
    want += bias[:, None, None]
    assert np.abs(want).max() >= nx.FLOAT32_EXACT            # the sums are past float32's exact range
    assert np.array_equal(got.astype(np.int64), want)
    one = conv.with_(attrs={**conv.attrs, "k_chunks": [(0, c * 9)]})
    single = run_int8(_graph(one, (c, hw, hw)), torch.from_numpy(x.astype(np.float32)), keep=())["conv"].numpy()
    assert not np.array_equal(single.astype(np.int64), want)   # one chunk: float32 rounding shows


def _linear_case():
    """A fully connected layer with K = 4096 inputs near 255 and weights of 127: sums up to
    132.7M (7.9 x 2^24). Returns (graph, inputs as float32, int64 outputs, chunks)."""
    rng = np.random.default_rng(1)
    o, k = 5, 4096
    w = _big_sums(rng, o, k)
    chunks = k_chunks(w, 255)
    bias = rng.integers(-1000, 1000, o).astype(np.int32)
    fc = QNode("fc", "linear", ("x",), (o,), True, 1.0, "int8", {"clamp": INT32, "k_chunks": chunks},
               {"weight": w, "bias": bias, **_identity_params(o)})
    x = rng.integers(200, 256, (3, k))
    want = x.astype(np.int64) @ w.astype(np.int64).T + bias
    return _graph(fc, (k,)), torch.from_numpy(x.astype(np.float32)), want, chunks


def test_linear_over_several_chunks_equals_int64():
    """The fully connected case of _linear_case: 8 chunks, equal to int64 numpy."""
    g, x, want, chunks = _linear_case()
    assert len(chunks) == 8, chunks
    assert np.abs(want).max() >= 4 * nx.FLOAT32_EXACT
    assert np.array_equal(run_int8(g, x, keep=())["fc"].numpy().astype(np.int64), want)


def test_fake_quant_integer_sums_are_exact_in_each_form():
    """fakequant.integer_sum (the fake-quant's own exact accumulator) against int64 numpy in its
    three forms: one float32 product (bound below 2^24), the split w = 16 h + l (the 3x3x128
    conv of test_conv_over_several_chunks_equals_int64: 37.3M), and float64 (K = 9,000 > 8,224)."""
    from netquant.ref.fakequant import integer_sum

    rng = np.random.default_rng(2)
    for o, k in ((3, 400), (4, 1152), (2, 9000)):
        w = _big_sums(rng, o, k)
        x = rng.integers(200, 256, (2, k))
        fc = QNode("fc", "linear", ("x",), (o,), True, 1.0, "int8", {"clamp": INT32}, {"weight": w})
        want = x.astype(np.int64) @ w.astype(np.int64).T
        got = integer_sum(fc, torch.from_numpy(x.astype(np.int32)))
        assert got.dtype == torch.float64 and np.array_equal(got.numpy().astype(np.int64), want), (o, k)
    # the conv form, over the split: every output of the 3x3x128 case
    w = _big_sums(rng, 4, 128 * 9).reshape(4, 128, 3, 3)
    x = rng.integers(200, 256, (2, 128, 6, 6))
    conv = QNode("conv", "conv", ("x",), (4, 6, 6), True, 1.0, "int8",
                 {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1, "clamp": INT32},
                 {"weight": w})
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = sum(np.einsum("nihw,oi->nohw", xp[:, :, i:i + 6, j:j + 6], w[:, :, i, j].astype(np.int64))
               for i in range(3) for j in range(3))
    assert np.abs(want).max() >= nx.FLOAT32_EXACT
    assert np.array_equal(integer_sum(conv, torch.from_numpy(x.astype(np.int32))).numpy().astype(np.int64), want)


def test_fake_quant_preactivation_of_a_linear_fed_a_4d_tensor():
    """fakequant.preactivation = s_x * s_w[o] * (sum_k x[k] w[o, k] + bias[o]), here for a linear
    layer that reads a (N, C, H, W) tensor (flattened as the executor's linear does), per output
    channel against the same formula in float64 numpy."""
    from netquant.ref.fakequant import preactivation

    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, (5, 2 * 3 * 3)).astype(np.int8)
    bias = rng.integers(-1000, 1000, 5).astype(np.int32)
    s_w = rng.uniform(0.005, 0.02, 5)
    fc = QNode("fc", "linear", ("x",), (5,), True, 1.0, "int8", {"clamp": INT32},
               {"weight": w, "bias": bias, "weight_scale": s_w})
    x = rng.integers(0, 256, (4, 2, 3, 3))
    got = preactivation(fc, torch.from_numpy(x.astype(np.int32)), 0.02).numpy()
    want = (x.reshape(4, -1).astype(np.int64) @ w.astype(np.int64).T + bias) * (0.02 * s_w)
    assert got.shape == (4, 5)
    np.testing.assert_allclose(got, want, rtol=1e-15)


def test_a_batch_run_in_chunks_gives_the_one_batch_integers(resnet20_quantizer, cifar, monkeypatch):
    """A batch larger than a chunk (here 16 images in chunks of 5: 5, 5, 5, 1) gives every kept
    node's integers of the same batch run whole."""
    import netquant.ref.executor as ex

    qg = resnet20_quantizer.quantize().qgraph
    x = torch.from_numpy(to_float(cifar.test.images[:16]))
    keep = ["S1U1_conv1", qg.output]
    monkeypatch.setattr(ex, "CHUNK_ELEMENTS", 1 << 30)
    whole = run_int8(qg, x, keep=keep)
    monkeypatch.setattr(ex, "CHUNK_ELEMENTS", 5 * 16 * 32 * 32)   # the largest activation of 5 images
    assert ex.chunk_images(qg) == 5
    chunked = run_int8(qg, x, keep=keep)
    assert set(chunked) == set(whole)
    for k in whole:
        assert chunked[k].shape == whole[k].shape and torch.equal(chunked[k], whole[k]), k


def test_two_threads_at_once_give_the_serial_integers(resnet20_quantizer, cifar):
    """Two threads run the executor on different images at the same time, three times each:
    every result equals the serial run's, bit for bit."""
    qg = resnet20_quantizer.quantize().qgraph
    batches = [torch.from_numpy(to_float(cifar.test.images[i:i + 16])) for i in (0, 16)]
    serial = [run_int8(qg, x, keep=())[qg.output].numpy() for x in batches]
    results, errors = {}, []
    start = threading.Barrier(2)

    def work(i):
        try:
            start.wait(timeout=120)
            results[i] = [run_int8(qg, batches[i], keep=())[qg.output].numpy() for _ in range(3)]
        except Exception as e:   # surfaced below: an exception in a thread is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        for r in results[i]:
            assert np.array_equal(r, serial[i])


@pytest.mark.skipif(not hasattr(torch.backends.mkldnn.matmul, "fp32_precision"),
                    reason="this torch has no oneDNN fp32_precision setting")
def test_overlapping_runs_keep_ieee_until_the_last_one_ends_and_then_restore():
    """Run A starts, run B starts, A ends while B still runs: B must still compute in IEEE
    float32, and when B ends the user's own setting (bf16 here) is back. (A save/restore per run
    would restore bf16 under B, and B would then leave "ieee" behind.)"""
    mm = torch.backends.mkldnn.matmul
    before = mm.fp32_precision, torch.backends.mkldnn.conv.fp32_precision
    try:
        mm.fp32_precision = "bf16"
        a, b = _ieee_fp32(), _ieee_fp32()
        a.__enter__()
        assert mm.fp32_precision == "ieee"
        b.__enter__()
        a.__exit__(None, None, None)
        assert mm.fp32_precision == "ieee"       # B is still running
        b.__exit__(None, None, None)
        assert mm.fp32_precision == "bf16"       # the user's setting, restored by the last to leave
        # a whole run under the user's new-API setting: exact, and the setting is kept (reading
        # the legacy matmul precision here would raise "mix of the legacy and new APIs")
        g, x, want, _ = _linear_case()
        assert np.array_equal(run_int8(g, x, keep=())["fc"].numpy().astype(np.int64), want)
        assert mm.fp32_precision == "bf16"
    finally:
        mm.fp32_precision, torch.backends.mkldnn.conv.fp32_precision = before
