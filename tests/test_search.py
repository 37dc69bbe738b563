"""Evaluations at scale (netquant.executor: local processes, a Ray cluster), the accuracy-budget
search (Quantizer.auto_precision, netquant quantize --max-drop) and power-of-two int8 with CLE
and bias correction, on the shipped network and real CIFAR-10."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import zoo
from netquant.accuracy.search import derive, memory_bytes, weight_bytes
from netquant.data.transforms import to_float
from netquant.executor import Executor, LocalExecutor, RayExecutor
from netquant.ir.float_exec import run_float
from netquant.models.pretrained import load_pretrained
from netquant.quant.config import QuantConfig
from netquant.quantizer import Quantizer

POW2 = dict(weight_granularity="per_tensor", scale="pow2")


def top1(scores, labels):
    return 100.0 * float((np.asarray(scores).argmax(1) == labels).mean())


@pytest.fixture(scope="module")
def shipped(cifar):
    """The shipped network, default scheme, calibrated on 200 training images."""
    q = Quantizer(load_pretrained("cifarnet-20-16"))
    q.calibrate(to_float(cifar.train.images[:200]))
    return q


@pytest.fixture(scope="module")
def small_pow2(cifar):
    q = Quantizer(zoo.make("resnet_a"), config=QuantConfig(**POW2), example=torch.rand(2, 3, 32, 32))
    q.calibrate(to_float(cifar.train.images[:32]))
    return q


# --- executors ------------------------------------------------------------------------------
def _square_plus(shared, item):
    return shared + item * item


def test_executors_return_results_in_item_order():
    items = list(range(7))
    seen = []
    expected = [10 + i * i for i in items]
    assert Executor().map(_square_plus, items, 10, progress=lambda d, t, m: seen.append((d, t))) == expected
    assert seen[-1] == (7, 7)
    for context in ("forkserver", "fork", "spawn"):
        assert LocalExecutor(2, context).map(_square_plus, items, 10) == expected


def test_sensitivity_in_worker_processes_matches_this_process(small_pow2, cifar):
    x, y = cifar.test.images[:20], cifar.test.labels[:20]
    here = small_pow2.sensitivity((x, y), batch_size=10, workers=1)
    there = small_pow2.sensitivity((x, y), batch_size=10, workers=2)
    assert list(here.Layer) == list(there.Layer) and here.attrs == there.attrs
    for col in ("QuantizedOnly", "FloatOnly", "DropQuantizedOnly", "GainFloatOnly"):
        assert (here[col] == there[col]).all(), col   # metrics on integer networks: exact
    # SQNR sums float activations; a worker runs torch on one thread, this process on several
    np.testing.assert_allclose(here.SQNR_dB, there.SQNR_dB, rtol=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sensitivity_on_a_local_ray_cluster_gives_the_local_table(small_pow2, cifar, monkeypatch):
    ray = pytest.importorskip("ray")
    # a private test cluster on 127.0.0.1: no token (a token file left in ~/.ray by another run
    # would otherwise be required by the head and raced by the client)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    x, y = cifar.test.images[:40], cifar.test.labels[:40]
    local = small_pow2.sensitivity((x, y), batch_size=10, workers=2)
    port = _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_bin if ray_bin.exists() else shutil.which("ray")), "start", "--head",
                             "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard", "false", "--disable-usage-stats", "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})   # with RAY_AUTH_MODE
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                ex = RayExecutor(f"127.0.0.1:{port}")
                break
            except Exception:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        try:
            assert ex.workers == 2
            remote = small_pow2.sensitivity((x, y), batch_size=10, executor=ex)
        finally:
            ex.close()
        assert not ray.is_initialized()
    finally:
        head.terminate()   # ray start --block stops the processes it started
        head.wait(60)
    pd.testing.assert_frame_equal(local, remote, check_exact=True)
    assert local.attrs == remote.attrs


# --- accuracy-budget search -----------------------------------------------------------------
def test_memory_model_counts_packed_4bit_weights(small_pow2):
    assert weight_bytes(1001, 4) == 501 and weight_bytes(1001, 8) == 1001
    layer = "layer3.0.conv2"
    q = derive(small_pow2, QuantConfig(**POW2, overrides={layer: {"weight_bits": 4}}), small_pow2.user_float)
    w = small_pow2.graph.node(layer).params["weight"].size
    base = small_pow2.learnable_memory()[1]
    assert q.learnable_memory()[1] == base - w // 2
    assert memory_bytes(q.graph, q.quantize().qgraph, q.config) == base - w // 2


def test_auto_precision_returns_a_measured_configuration(small_pow2, cifar, tmp_path):
    q0 = small_pow2
    x, y = cifar.test.images[:24], cifar.test.labels[:24]
    before = (q0.config, q0.user_float)
    q, front, explored = q0.auto_precision((x, y), max_drop=0.0, max_evaluations=16, workers=2, batch_size=12)
    assert (q0.config, q0.user_float) == before   # the quantizer searched on is unchanged
    layers = [n.name for n in q0.quantize().qgraph.nodes if n.quantized and n.op in ("conv", "linear")]
    probes = 1 + len(layers) * (1 + int(explored.Step.str.contains("one layer float").any()))
    assert probes < len(explored) <= probes + 16   # max_evaluations counts what follows the probes
    assert (explored[["W4A8", "Int8", "Float"]].sum(axis=1) == len(layers)).all()
    chosen = explored[explored.Chosen].iloc[0]
    f = top1(run_float(q0.graph, torch.from_numpy(to_float(x)), keep=())[q0.graph.output].numpy(), y)
    assert explored.attrs["float"] == f and chosen.Drop <= 0.0
    # what was measured is what the returned quantizer computes, and its memory
    assert top1(q.quantize().run(x), y) == chosen.Metric
    assert q.learnable_memory()[1] == chosen.MemoryBytes
    w4 = [k for k, v in q.config.overrides.items() if v.get("weight_bits") == 4]
    assert len(w4) == chosen.W4A8 and set(q.user_float) - set(q0.user_float) == set(
        k for k in layers if k in q.user_float)
    assert all(np.abs(q.quantize().qgraph.node(k).params["weight"]).max() <= 7 for k in w4)
    # the front: ascending memory, each point better in metric than every cheaper one
    assert front.MemoryBytes.is_monotonic_increasing and front.Metric.is_monotonic_increasing
    assert chosen.Pareto
    # an ordinary quantizer: saved and loaded with its choices
    q.save(tmp_path / "mixed.nq")
    back = Quantizer.load(tmp_path / "mixed.nq")
    assert back.config == q.config and back.user_float == q.user_float
    assert np.array_equal(back.quantize().run(x[:8]), q.quantize().run(x[:8]))


def _fidelity(reference, scores, labels):
    """A custom metric, higher is better: minus the mean absolute difference from the float
    network's scores (0 for float itself)."""
    return -float(np.abs(np.asarray(scores) - reference).mean())


def test_auto_precision_puts_layers_in_float_when_int8_misses_the_budget(small_pow2, cifar):
    """Step 2 of the search: with a metric on which int8 loses (fidelity to the float scores) and a
    budget of half its loss, every layer is probed in float alone, layers go to float in the order
    of their probed gain until a measured configuration fits, and the choice is one that fits."""
    import functools

    q0 = small_pow2
    x, y = cifar.test.images[:16], cifar.test.labels[:16]
    reference = run_float(q0.graph, torch.from_numpy(to_float(x)), keep=())[q0.graph.output].numpy()
    metric = functools.partial(_fidelity, reference)
    int8_loss = -metric(q0.quantize().run(x), y)
    assert int8_loss > 0
    q, front, explored = q0.auto_precision((x, y), max_drop=int8_loss / 2, metric=metric, max_evaluations=40,
                                           workers=1, batch_size=16)
    # the float network as the search runs it (through the QGraph, every layer float): float32 noise
    assert abs(explored.attrs["float"]) < 1e-5 and explored.attrs["int8"] == -int8_loss
    layers = [n.name for n in q0.quantize().qgraph.nodes if n.quantized and n.op in ("conv", "linear")]
    assert explored.Step.str.contains("one layer float").sum() == len(layers)
    assert explored.Step.str.contains("float layers for the budget").any()
    chosen = explored[explored.Chosen].iloc[0]
    assert chosen.Drop <= int8_loss / 2 and chosen.Float >= 1
    assert len(q.user_float - q0.user_float) == chosen.Float
    assert metric(q.quantize().run(x), y) == chosen.Metric   # what was measured is what it computes


def test_auto_precision_checks_its_arguments(small_pow2, cifar):
    xy = (cifar.test.images[:4], cifar.test.labels[:4])
    with pytest.raises(ValueError, match="max_drop"):
        small_pow2.auto_precision(xy, max_drop=-1)
    with pytest.raises(ValueError, match="objective"):
        small_pow2.auto_precision(xy, objective="latency")
    with pytest.raises(ValueError, match="needs labels"):
        small_pow2.auto_precision(cifar.test.images[:4])


@pytest.mark.slow
def test_cli_quantize_max_drop_prints_the_front_and_saves_the_choice(tmp_path, capsys):
    from netquant.cli import main

    out = tmp_path / "auto.nq"
    assert main(["quantize", "--data", "sample", "--calibration", "16", "--validation", "20", "--max-drop", "100",
                 "--workers", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Pareto front (memory vs metric)" in text and "chosen: metric" in text
    q = Quantizer.load(out)
    assert any(v.get("weight_bits") == 4 for v in q.config.overrides.values())
    assert "weights int4" in text   # the details table of the chosen network
    assert main(["quantize", "--data", "sample", "--max-drop", "-1", "--out", str(out)]) == 2


def _c_top1(q, x, y) -> float:
    """Top-1 of the compiled C library (bit-exact with the reference executor, tests/test_engine_c.py)."""
    net = q.compiled()
    return top1(np.concatenate([net.predict_int(x[i:i + 1000]) for i in range(0, len(x), 1000)]), y)


@pytest.fixture(scope="module")
def float_top1_full():
    """The shipped float network's top-1 on all 10,000 test images: its card's figure, which
    test_codegen_c.py's full-set check measures (to 0.05 points) on every run of the suite."""
    from netquant.models.pretrained import read_card

    return read_card("cifarnet-20-16")["test_top1"]


@pytest.mark.slow
@pytest.mark.compiler
@pytest.mark.timeout(3600)   # about 3 minutes on 2 free cores; far longer on a shared machine
def test_auto_precision_budget_holds_on_the_full_test_set(shipped, cifar, float_top1_full):
    """The choice made on the first 1,000 test images holds on all 10,000, within 0.5 points of
    slack. The budget is 0.3 points: int8 alone drops 0.3 on these 1,000 (93.10 -> 92.80) and
    none on all 10,000 (92.61 -> 92.62), so the search goes straight to W4A8 (the float-layer step
    is tested on the small network above); on 500 images a 0.1 budget's choice measured 0.38 below
    float on all 10,000. The slack is the 1,000-image estimate's own error, not a margin of the
    search: the same search chose 2 W4A8 layers on a Zen 3 (92.42 on all 10,000) and 10 on a Zen 4
    (92.06; drop 0.00 on the 1,000), whose torch kernels round AdaRound's float steps differently;
    a difference of two nets that disagree on ~30 of 1,000 images has a standard error of ~0.5."""
    n, budget = 1000, 0.3
    result = shipped.auto_precision((cifar.test.images[:n], cifar.test.labels[:n]), max_drop=budget, max_evaluations=12)
    q, front, explored = result
    chosen = explored[explored.Chosen].iloc[0]
    x, y = to_float(cifar.test.images), cifar.test.labels
    mixed = _c_top1(q, x, y)
    int8_bytes, mixed_bytes = shipped.learnable_memory()[1], q.learnable_memory()[1]
    print(f"\nauto_precision(max_drop={budget}) on {n} test images: {chosen.W4A8} W4A8, {chosen.Int8} int8, "
          f"{chosen.Float} float layers (drop {chosen.Drop:.2f} there); full test set top-1 float {float_top1_full:.2f}, "
          f"chosen {mixed:.2f} ({mixed_bytes} bytes against {int8_bytes} int8); {len(explored)} configurations")
    assert chosen.W4A8 >= 1 and chosen.Float == 0
    assert float_top1_full - mixed <= budget + 0.5
    assert mixed_bytes < int8_bytes


# --- power-of-two per-tensor int8 with CLE and bias correction ------------------------------
def _pow2_pair(model, calib, example=None):
    """(plain, CLE + bias correction) pow2 per-tensor quantizers calibrated on ``calib``."""
    out = []
    for extra in ({}, {"cle": True, "bias_correction": True}):
        q = Quantizer(model, config=QuantConfig(**POW2, **extra), example=example)
        q.calibrate(calib)
        out.append(q)
    return out


@pytest.mark.slow
@pytest.mark.compiler
def test_pow2_with_cle_and_bias_correction_no_worse_on_the_shipped_net(cifar, float_top1_full):
    plain, tuned = _pow2_pair(load_pretrained("cifarnet-20-16"), to_float(cifar.train.images[:200]))
    x, y = to_float(cifar.test.images), cifar.test.labels
    a, b = _c_top1(plain, x, y), _c_top1(tuned, x, y)
    print(f"\nshipped net, pow2 per tensor, 10,000 test images: float {float_top1_full:.2f}, plain {a:.2f}, "
          f"CLE + bias correction {b:.2f}")
    assert b >= a


@pytest.fixture(scope="module")
def deeper_net(cifar):
    """A ResNet-56 (9 units per stage, 8 channels wide: a quarter of the width-16 cost) trained
    briefly on real CIFAR-10 (nothing saved)."""
    from netquant.data.cifar10 import Cifar10
    from netquant.models import resnet
    from netquant.models.train import TrainConfig, train

    data = Cifar10(cifar.train.take(slice(0, 3000), "first 3000"), cifar.test.take(slice(0, 200), "first 200"))
    torch.manual_seed(0)
    net = resnet(8, 9)
    report = train(net, data, TrainConfig(epochs=2, batch_size=64, lr=0.05, warmup_epochs=0.3, eval_every=2,
                                          bf16=False))
    return net.eval(), report


@pytest.mark.slow
@pytest.mark.compiler
@pytest.mark.timeout(3600)   # the training: about a minute on 2 free cores
def test_pow2_with_cle_and_bias_correction_on_a_deeper_trained_resnet(cifar, deeper_net):
    net, report = deeper_net
    plain, tuned = _pow2_pair(net, to_float(cifar.train.images[3000:3200]))
    x, y = to_float(cifar.test.images[:2000]), cifar.test.labels[:2000]
    f = top1(np.concatenate([run_float(plain.graph, torch.from_numpy(x[i:i + 500]), keep=())[plain.graph.output]
                             .numpy() for i in range(0, len(x), 500)]), y)
    a, b = _c_top1(plain, x, y), _c_top1(tuned, x, y)
    print(f"\nResNet-56 (width 8) trained {report.epochs} epochs on 3,000 images, pow2 per tensor, 2,000 test images: "
          f"float {f:.2f}, plain {a:.2f}, CLE + bias correction {b:.2f} ({b - a:+.2f})")
    assert b >= a - 0.5   # reported; the improvement is the number, the floor catches a broken pass
