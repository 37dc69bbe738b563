"""The prepared GPU check of the CUDA target (issue 6): one command, a few minutes on a GPU machine.

    python bench/gpu_check.py [--data PATH] [--test-batch test_batch.bin] [--arch sm_90]

1. calibrates the shipped ResNet-20 on 200 real training images, generates CUDA for this GPU and
   builds it with nvcc (``--test-batch``: where only the official ``test_batch.bin`` can travel to
   the GPU machine, calibrate on the embedded sample's training images and test on that file,
   checked against its published md5);
2. runs the library on the full real CIFAR-10 test set and asserts its integer outputs equal the
   integer reference executor's, bit for bit (and prints top-1);
   Both CUDA variants are checked: dp4a kernels and, on sm_80 and newer, int8 tensor cores;
3. measures images/s at batch 1, 256 and 4096 against PyTorch fp32 and fp16 (channels_last,
   cudnn.benchmark) on the same GPU in the same run, and prints the ratios;
4. prints the time of each generated kernel at batch 4096 (torch.profiler sees every CUDA kernel
   of the process, the library's too).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from netquant.codegen import generate, load  # noqa: E402
from netquant.data import calibration_set, load_cifar10, to_float  # noqa: E402
from netquant.data.cifar10 import BINARY_MD5, Cifar10, ImageSet, check_md5, parse_binary_batch, read_sample  # noqa: E402
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
    ap.add_argument("--test-batch", help="the official test_batch.bin (calibrate on the embedded sample)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no GPU"
    major, minor = torch.cuda.get_device_capability()
    arch = args.arch or f"sm_{major}{minor}"
    if args.test_batch:
        raw = open(args.test_batch, "rb").read()
        check_md5("test_batch.bin", raw, BINARY_MD5["test_batch.bin"], args.test_batch)
        test = ImageSet(*parse_binary_batch(raw, args.test_batch), f"CIFAR-10 test set ({args.test_batch})")
        data = Cifar10(read_sample().train, test)
    else:
        data = load_cifar10(args.data)
    print(f"calibration: {data.train.source}; test: {data.test.source}", flush=True)
    net = load_pretrained()
    q = Quantizer(net)
    q.calibrate(calibration_set(data))
    qnet = q.quantize()
    x = to_float(data.test.images)
    name = qnet.qgraph.int_output()
    ref = np.concatenate([run_int8(qnet.qgraph, torch.from_numpy(x[i:i + 1000]), keep=[name])[name].numpy()
                          for i in range(0, len(x), 1000)])
    variants = ["dp4a"] + (["mma"] if major >= 8 else [])   # int8 mma.sync.m16n8k32: sm_80 and newer
    exact = True
    with tempfile.TemporaryDirectory() as tmp:
        libs = {}
        for v in variants:
            t0 = time.time()
            gen = generate(qnet, os.path.join(tmp, v), name=f"rn20_{v}", target="cuda", arch=arch,
                           tensor_cores=(v == "mma"))
            cnet = load(gen)
            libs[v] = cnet
            print(f"[{v}] built for {arch} in {time.time() - t0:.1f} s on {torch.cuda.get_device_name()}")
            got = cnet.predict_int(x)
            ok = bool(np.array_equal(got, ref))
            exact &= ok
            top1 = 100 * float((cnet.predict(x).argmax(1) == data.test.labels).mean())
            print(f"[{v}] bit-exact with the reference executor on {len(x)} images ({data.test.source}): {ok}; "
                  f"int8 top-1 {top1:.2f}%", flush=True)
            if not ok:
                bad = np.argwhere(got != ref)
                print(f"[{v}] MISMATCH: {len(bad)} of {got.size} integers differ; first at {bad[0].tolist()}: "
                      f"{got[tuple(bad[0])]} vs {ref[tuple(bad[0])]}", flush=True)
        torch.backends.cudnn.benchmark = True
        gpu_net = net.cuda().to(memory_format=torch.channels_last)
        half = load_pretrained().cuda().half().to(memory_format=torch.channels_last)
        sync = torch.cuda.synchronize
        print(f"{'batch':>6s} " + " ".join(f"{'int8 ' + v:>11s}" for v in variants) +
              f" {'torch fp32':>11s} {'torch fp16':>11s} " + " ".join(f"{v + '/fp16':>10s}" for v in variants))
        fns = {}
        for v, cnet in libs.items():
            f = getattr(cnet.lib, f"rn20_{v}_predict_device")
            # (d_images, images_len, n, d_scores, scores_len): lengths in elements
            f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
            fns[v] = f
        for b in (1, 256, 4096):
            xb = np.resize(x, (b,) + x.shape[1:])
            d_in = torch.from_numpy(xb).cuda()
            d_out = torch.empty((b, 10), device="cuda")
            ours = {v: rate(lambda f=f: f(d_in.data_ptr(), d_in.numel(), b, d_out.data_ptr(), d_out.numel()), b, sync)
                    for v, f in fns.items()}
            xc = d_in.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                fp32 = rate(lambda: gpu_net(xc), b, sync)
                xh = xc.half()
                fp16 = rate(lambda: half(xh), b, sync)
            print(f"{b:6d} " + " ".join(f"{ours[v]:11.0f}" for v in variants) + f" {fp32:11.0f} {fp16:11.0f} " +
                  " ".join(f"{ours[v] / fp16:9.2f}x" for v in variants), flush=True)
        # per-kernel time of each generated library at the largest batch
        from torch.profiler import ProfilerActivity, profile

        for v, f in fns.items():
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    f(d_in.data_ptr(), d_in.numel(), b, d_out.data_ptr(), d_out.numel())
                sync()
            print(f"[{v}] kernels at batch {b}, 5 calls:")
            for key in ("device_time_total", "cuda_time_total"):
                try:
                    print(prof.key_averages().table(sort_by=key, row_limit=25))
                    break
                except (AttributeError, KeyError, ValueError):
                    continue
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
