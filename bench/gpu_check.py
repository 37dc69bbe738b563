"""The prepared GPU check of the CUDA target (issue 6): one command, a few minutes on a GPU machine.

    python bench/gpu_check.py [--data PATH] [--arch sm_90]

1. calibrates the shipped ResNet-20 on 200 real training images, generates CUDA for this GPU and
   builds it with nvcc;
2. runs the library on the full real CIFAR-10 test set and asserts its integer outputs equal the
   integer reference executor's, bit for bit (and prints top-1);
3. measures images/s at batch 1, 256 and 4096 against PyTorch fp32 and fp16 (channels_last,
   cudnn.benchmark) on the same GPU in the same run, and prints the ratios.
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
from netquant.models.pretrained import load_pretrained  # noqa: E402
from netquant.quantizer import Quantizer  # noqa: E402
from netquant.ref.executor import run_int8  # noqa: E402


def rate(fn, n: int, sync, seconds: float = 1.0) -> float:
    fn()
    sync()
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        k += 1
    sync()
    return k * n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--arch")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no GPU"
    major, minor = torch.cuda.get_device_capability()
    arch = args.arch or f"sm_{major}{minor}"
    data = load_cifar10(args.data)
    net = load_pretrained()
    q = Quantizer(net)
    q.calibrate(calibration_set(data))
    qnet = q.quantize()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        gen = generate(qnet, tmp, name="resnet20", target="cuda", arch=arch)
        cnet = load(gen)
        print(f"built for {arch} in {time.time() - t0:.1f} s on {torch.cuda.get_device_name()}")
        x = to_float(data.test.images)
        name = qnet.qgraph.int_output()
        got = cnet.predict_int(x)
        ref = np.concatenate([run_int8(qnet.qgraph, torch.from_numpy(x[i:i + 1000]), keep=[name])[name].numpy()
                              for i in range(0, len(x), 1000)])
        exact = bool(np.array_equal(got, ref))
        top1 = 100 * float((cnet.predict(x).argmax(1) == data.test.labels).mean())
        print(f"bit-exact with the reference executor on {len(x)} images ({data.test.source}): {exact}; "
              f"int8 top-1 {top1:.2f}%")
        assert exact
        torch.backends.cudnn.benchmark = True
        gpu_net = net.cuda().to(memory_format=torch.channels_last)
        half = load_pretrained().cuda().half().to(memory_format=torch.channels_last)
        sync = torch.cuda.synchronize
        print(f"{'batch':>6s} {'netquant int8':>14s} {'torch fp32':>11s} {'torch fp16':>11s} {'vs fp32':>8s} {'vs fp16':>8s}")
        for b in (1, 256, 4096):
            xb = np.resize(x, (b,) + x.shape[1:])
            d_in = torch.from_numpy(xb).cuda()
            d_out = torch.empty((b, 10), device="cuda")
            f = cnet.lib.resnet20_predict_device
            import ctypes

            f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
            ours = rate(lambda: f(d_in.data_ptr(), b, d_out.data_ptr()), b, sync)
            xc = d_in.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                fp32 = rate(lambda: gpu_net(xc), b, sync)
                xh = xc.half()
                fp16 = rate(lambda: half(xh), b, sync)
            print(f"{b:6d} {ours:14.0f} {fp32:11.0f} {fp16:11.0f} {ours / fp32:7.2f}x {ours / fp16:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
