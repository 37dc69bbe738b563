"""CPU throughput of the generated C library against baselines measured in the same run.

    python bench/bench_cpu.py [--data PATH] [--batches 1 32 256] [--threads 1 2] [--isa native]

Engines (same network, same weights, same images): the generated C library (int8), PyTorch fp32
eager, and netquant's Python integer executor. Each prints images/s and its ratio to PyTorch fp32
measured in the same run (these machines are noisy: compare ratios, not absolute numbers), and
the fraction of this CPU's int8 peak (ResNet-20 is 40.8M MACs per image; AVX-512 VNNI does two
64-MAC instructions per cycle per core: 2 * 64 * GHz * cores MAC/s).
Peers still to add (issue 4): ONNX Runtime int8 (QDQ), OpenVINO int8 (NNCF), PyTorch PT2E x86.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from netquant.codegen import generate, load  # noqa: E402
from netquant.data import calibration_set, load_cifar10, to_float  # noqa: E402
from netquant.models.analyze import analyze  # noqa: E402
from netquant.models.pretrained import load_pretrained  # noqa: E402
from netquant.quantizer import Quantizer  # noqa: E402


def cpu_ghz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) / 1000
    except OSError:
        pass
    return 2.75


def timeit(fn, x, min_seconds: float = 1.0) -> float:
    fn(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return n * len(x) / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--isa", default="native")
    ap.add_argument("--python-executor", action="store_true", help="also time the Python integer executor")
    args = ap.parse_args()
    data = load_cifar10(args.data)
    net = load_pretrained()
    macs = analyze(net).macs
    q = Quantizer(net)
    q.calibrate(calibration_set(data))
    qnet = q.quantize()
    with tempfile.TemporaryDirectory() as tmp:
        cnet = load(generate(qnet, tmp, name="resnet20", isa=args.isa))
        print(f"data: {data.test.source}; CPU: {os.cpu_count()} cores at ~{cpu_ghz():.2f} GHz")
        print(f"{'engine':24s} {'batch':>5s} {'threads':>7s} {'img/s':>9s} {'vs torch fp32':>13s} {'% int8 peak':>11s}")
        for threads in args.threads:
            torch.set_num_threads(threads)
            cnet.set_num_threads(threads)
            peak = 2 * 64 * cpu_ghz() * 1e9 * threads  # VNNI MAC/s
            for b in args.batches:
                x = to_float(data.test.images[:b])
                xt = torch.from_numpy(x)
                with torch.no_grad():
                    base = timeit(lambda v: net(v), xt)
                rows = [("torch fp32 eager", base), (f"netquant C ({args.isa})", timeit(cnet.predict, x))]
                if args.python_executor:
                    rows.append(("netquant Python int8", timeit(qnet.run, x)))
                for name, ips in rows:
                    print(f"{name:24s} {b:5d} {threads:7d} {ips:9.0f} {ips / base:12.2f}x {100 * ips * macs / peak:10.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
