"""The prepared GPU check of the CUDA target (issue 6): one command, a few minutes on a GPU machine.

    python bench/gpu_check.py [--data PATH] [--test-batch test_batch.bin] [--arch sm_90] [--log FILE]

1. calibrates the shipped ResNet-20 on 200 real training images, generates CUDA for this GPU and
   builds it with nvcc (``--test-batch``: where only the official ``test_batch.bin`` can travel to
   the GPU machine, calibrate on the embedded sample's training images and test on that file,
   checked against its published md5);
2. runs the library on the full real CIFAR-10 test set and asserts its integer outputs equal the
   integer reference executor's, bit for bit (and prints top-1);
   Both CUDA variants are checked: dp4a kernels and, on sm_80 and newer, int8 tensor cores
   (block tiles through shared memory: cp.async, ldmatrix, mma.sync; the default there);
3. measures images/s at batch 1, 256 and 4096 against PyTorch fp32 and fp16 (channels_last,
   cudnn.benchmark) and fp16 under torch.compile (where it compiles; ``--no-compile`` skips it)
   on the same GPU in the same run, and prints the ratios to fp16;
4. prints the time of each generated kernel at batch 4096 (torch.profiler sees every CUDA kernel
   of the process, the library's too);
5. ResNet-50 at 224x224 (bench/models.py, calibrated on 50 upsampled training images; skip with
   ``--skip-resnet50``): tensor cores on sm_80 and newer, bit-exact on 4 test images, images/s at
   batch 1 and 256 against PyTorch fp32 and fp16. Its generation and build need no GPU
   (``build_resnet50``, tried on the CPU machines: sources 0.1 MB + 25 MB of weights).

The first lines say when and where it ran (date, GPU, driver, CUDA, torch); ``--log FILE`` writes
everything printed to FILE as well (the record to commit under docs/).

``--cpu-dry-run`` runs every step of the script without a GPU, on a few images and small batches:
the libraries are the CUDA sources built for the CPU emulation (netquant/codegen/cuda_emulation.py)
and PyTorch runs on the CPU. Its figures mean nothing; it checks that the script itself runs
through (a GPU is lent for minutes, now and then) and that the sources it builds are bit-exact.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import models as bench_models  # noqa: E402  (bench/models.py: ResNet-50 at 224, step 5)
from netquant.codegen import build, generate, load  # noqa: E402
from netquant.codegen.cuda_emulation import build_emulated  # noqa: E402
from netquant.data import calibration_set, load_cifar10, to_float  # noqa: E402
from netquant.data.cifar10 import BINARY_MD5, Cifar10, ImageSet, check_md5, parse_binary_batch, read_sample  # noqa: E402
from netquant.models.pretrained import load_pretrained  # noqa: E402
from netquant.quantizer import Quantizer  # noqa: E402
from netquant.ref.executor import run_int8  # noqa: E402


class Tee:
    """stdout, and a log file: print() goes to both."""

    def __init__(self, stream, path: str):
        self.stream, self.file = stream, open(path, "w")

    def write(self, text: str):
        self.stream.write(text)
        self.file.write(text)
        self.file.flush()

    def flush(self):
        self.stream.flush()


def where(dry: bool) -> str:
    """Date, GPU, driver, CUDA and torch of this run, one line."""
    import datetime
    import subprocess

    if dry:
        return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU DRY RUN (the CUDA emulation, "
                f"figures meaningless); torch {torch.__version__}")
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    p = torch.cuda.get_device_properties(0)
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {p.name} (sm_{p.major}{p.minor}, "
            f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB); driver {driver}; CUDA {torch.version.cuda}; "
            f"torch {torch.__version__}")


def compiled_rate(model, x, b: int, sync, budget: dict) -> float:
    """images/s of torch.compile(model) on x, or nan where it does not compile (or the compile
    time budget of the run, budget["s"], is spent: each batch size compiles again)."""
    if budget["s"] <= 0:
        return float("nan")
    t0 = time.time()
    try:
        if "fn" not in budget:
            budget["fn"] = torch.compile(model)
        budget["fn"](x)
        sync()
    except Exception as e:  # noqa: BLE001  # "where it works": a failure is a blank column, not a failed check
        print(f"[torch.compile] failed, column left empty: {type(e).__name__}: {str(e)[:200]}", flush=True)
        budget["s"] = 0
        return float("nan")
    budget["s"] -= time.time() - t0
    return rate(lambda: budget["fn"](x), b, sync)


def device_entry(cnet, name: str):
    """The library's ``<name>_predict_device`` as run(d_in, d_out) on device tensors (n images in,
    n score rows out; lengths in elements)."""
    f = getattr(cnet.lib, f"{name}_predict_device")
    f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    return lambda d_in, d_out: f(d_in.data_ptr(), d_in.numel(), d_in.shape[0], d_out.data_ptr(), d_out.numel())


def torch_rates(fp32_net, fp16_net, d_in, sync, budget: dict) -> tuple:
    """images/s of PyTorch on the images ``d_in`` (channels_last): fp32, fp16, fp16 under
    torch.compile (compiled_rate: nan where it does not compile), and the best of the three."""
    b = d_in.shape[0]
    xc = d_in.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fp32 = rate(lambda: fp32_net(xc), b, sync)
        xh = xc.half()
        fp16 = rate(lambda: fp16_net(xh), b, sync)
        comp = compiled_rate(fp16_net, xh, b, sync, budget)
    return fp32, fp16, comp, max(fp16, fp32, 0.0 if np.isnan(comp) else comp)


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
    ap.add_argument("--skip-resnet50", action="store_true", help="only ResNet-20 (step 5 adds about 2 minutes)")
    ap.add_argument("--no-compile", action="store_true", help="no torch.compile column")
    ap.add_argument("--log", help="also write the output to this file")
    ap.add_argument("--cpu-dry-run", action="store_true", help="every step without a GPU (the CUDA emulation, "
                    "8 test images, batches 1 and 4): checks the script, not the speed")
    args = ap.parse_args()
    if args.log:
        sys.stdout = Tee(sys.stdout, args.log)
    dry = args.cpu_dry_run
    assert dry or torch.cuda.is_available(), "no GPU (--cpu-dry-run runs the script without one)"
    print(where(dry), flush=True)
    major, minor = (9, 0) if dry else torch.cuda.get_device_capability()
    arch = args.arch or f"sm_{major}{minor}"
    dev = "cpu" if dry else "cuda"
    library = build_emulated if dry else load   # the emulation needs no nvcc and no GPU
    gpu_name = "the CUDA emulation" if dry else torch.cuda.get_device_name()
    batches = (1, 4) if dry else (1, 256, 4096)
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
    x = to_float(data.test.images[:8] if dry else data.test.images)
    labels = data.test.labels[:len(x)]
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
            cnet = library(gen)
            print(f"[{v}] built for {arch} in {time.time() - t0:.1f} s on {gpu_name}")
            try:
                got = cnet.predict_int(x)
            except Exception as e:  # noqa: BLE001  # say which variant failed, and go on with the others
                print(f"[{v}] FAILED on the GPU: {type(e).__name__}: {e}", flush=True)
                exact = False
                continue
            libs[v] = cnet
            ok = bool(np.array_equal(got, ref))
            exact &= ok
            top1 = 100 * float((cnet.predict(x).argmax(1) == labels).mean())
            print(f"[{v}] bit-exact with the reference executor on {len(x)} images ({data.test.source}): {ok}; "
                  f"int8 top-1 {top1:.2f}%", flush=True)
            if not ok:
                bad = np.argwhere(got != ref)
                print(f"[{v}] MISMATCH: {len(bad)} of {got.size} integers differ; first at {bad[0].tolist()}: "
                      f"{got[tuple(bad[0])]} vs {ref[tuple(bad[0])]}", flush=True)
        torch.backends.cudnn.benchmark = True
        gpu_net = net.to(dev).to(memory_format=torch.channels_last)
        half = load_pretrained().to(dev).half().to(memory_format=torch.channels_last)
        sync = (lambda: None) if dry else torch.cuda.synchronize
        budget = {"s": -1.0 if args.no_compile or dry else 60.0}   # seconds of torch.compile (each batch size compiles)
        variants = list(libs)
        print(f"{'batch':>6s} " + " ".join(f"{'int8 ' + v:>11s}" for v in variants) +
              f" {'torch fp32':>11s} {'torch fp16':>11s} {'compiled fp16':>13s} " +
              " ".join(f"{v + '/fp16':>10s}" for v in variants) + " " + " ".join(f"{v + '/best':>10s}" for v in variants))
        fns = {v: device_entry(cnet, f"rn20_{v}") for v, cnet in libs.items()}
        for b in batches:
            xb = np.resize(x, (b,) + x.shape[1:])
            d_in = torch.from_numpy(xb).to(dev)
            d_out = torch.empty((b, 10), device=dev)
            ours = {v: rate(lambda f=f: f(d_in, d_out), b, sync) for v, f in fns.items()}
            fp32, fp16, comp, best = torch_rates(gpu_net, half, d_in, sync, budget)
            print(f"{b:6d} " + " ".join(f"{ours[v]:11.0f}" for v in variants) + f" {fp32:11.0f} {fp16:11.0f} {comp:13.0f} " +
                  " ".join(f"{ours[v] / fp16:9.2f}x" for v in variants) + " " +
                  " ".join(f"{ours[v] / best:9.2f}x" for v in variants), flush=True)
        # per-kernel time of each generated library at the largest batch
        from torch.profiler import ProfilerActivity, profile

        for v, f in fns.items():
            with profile(activities=[ProfilerActivity.CPU if dry else ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    f(d_in, d_out)
                sync()
            print(f"[{v}] kernels at batch {b}, 5 calls:")
            for key in ("device_time_total", "cuda_time_total"):
                try:
                    print(prof.key_averages().table(sort_by=key, row_limit=25))
                    break
                except (AttributeError, KeyError, ValueError):
                    continue
        if not args.skip_resnet50:
            try:
                exact &= resnet50_check(data, arch, major, tmp, sync, -1.0 if args.no_compile or dry else 60.0, dry)
            except Exception as e:  # noqa: BLE001  # the ResNet-20 results above stand either way
                print(f"[resnet50] FAILED: {type(e).__name__}: {e}", flush=True)
                exact = False
    return 0 if exact else 1


def build_resnet50(data, arch: str, tensor_cores: bool, folder: str, calibration: int = 50, dry: bool = False):
    """ResNet-50 at 224x224 (bench/models.py: torchvision's definition, seeded random weights with
    non-trivial batch norms) calibrated on ``calibration`` upsampled CIFAR-10 training images,
    and its CUDA sources generated and built (no GPU needed up to here; ``dry``: for the CPU
    emulation). Returns (float net, quantized net, Generated, the library)."""
    net = bench_models.resnet50().eval()
    calib, _, _ = bench_models.calibration_images(data, calibration)
    q = Quantizer(net, example=torch.from_numpy(calib[:2]))
    q.calibrate(calib, batch_size=10)
    qnet = q.quantize()
    t0 = time.time()
    gen = generate(qnet, folder, name="rn50", target="cuda", arch=arch, tensor_cores=tensor_cores)
    if dry:
        lib = build_emulated(gen)
        spills = []
    else:
        lib = load(gen, library=build(gen))
        spills = [k for k in gen.build["device_kernels"] if k["spill_stores"] or k["spill_loads"]]
    print(f"[resnet50] {'mma' if tensor_cores else 'dp4a'} sources {sum(gen.sizes.values()) / 1e6:.1f} MB, generated "
          f"and built for {arch} in {time.time() - t0:.1f} s; kernels spilling registers: {len(spills)}", flush=True)
    return net, qnet, gen, lib


def resnet50_check(data, arch: str, major: int, tmp: str, sync, compile_s: float, dry: bool = False) -> bool:
    """ResNet-50 at 224: bit-exact with the reference executor on 4 test images (the Python
    executor takes 1-2 s an image), then images/s at batch 1 and 256 against PyTorch fp32 and
    fp16 (channels_last, cudnn.benchmark) and fp16 under torch.compile (at most ``compile_s`` seconds of
    compiling; negative: not tried)."""
    net, qnet, gen, cnet = build_resnet50(data, arch, major >= 8, os.path.join(tmp, "rn50"), dry=dry)
    dev = "cpu" if dry else "cuda"
    x = bench_models.upsampled(data.test.images[:1 if dry else 4])
    name = qnet.qgraph.int_output()
    ref = run_int8(qnet.qgraph, torch.from_numpy(x), keep=[name])[name].numpy()
    ok = bool(np.array_equal(cnet.predict_int(x), ref))
    print(f"[resnet50] bit-exact with the reference executor on {len(x)} image{'s' * (len(x) > 1)}: {ok}", flush=True)
    f = device_entry(cnet, "rn50")
    gpu_net = net.to(dev).to(memory_format=torch.channels_last)
    half = bench_models.resnet50().eval().to(dev).half().to(memory_format=torch.channels_last)
    budget = {"s": compile_s}
    print(f"{'batch':>6s} {'int8':>9s} {'torch fp32':>11s} {'torch fp16':>11s} {'compiled fp16':>13s} "
          f"{'int8/fp16':>10s} {'int8/best':>10s}")
    for b in (1,) if dry else (1, 256):
        xb = np.resize(x, (b,) + x.shape[1:])
        d_in = torch.from_numpy(xb).to(dev)
        d_out = torch.empty((b, 1000), device=dev)
        ours = rate(lambda: f(d_in, d_out), b, sync)
        fp32, fp16, comp, best = torch_rates(gpu_net, half, d_in, sync, budget)
        print(f"{b:6d} {ours:9.0f} {fp32:11.0f} {fp16:11.0f} {comp:13.0f} {ours / fp16:9.2f}x {ours / best:9.2f}x",
              flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
