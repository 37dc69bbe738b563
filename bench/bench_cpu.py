"""CPU throughput of the generated C library against baselines and peer int8 engines, same run.

    python bench/bench_cpu.py [--model cifarnet-20-16|resnet18|resnet50|mobilenetv2] [--data PATH]
                              [--batches 1 32 256] [--threads 1 2] [--isa native avx512 avx2]
                              [--engines c ort openvino pt2e] [--python-executor] [--rounds 3] [--seconds 0.5]
                              [--calibration 200] [--c-timeout 900] [--c-memory-gb 8]

``--model``: the shipped ResNet-20 (``cifarnet-20-16``, 32x32 CIFAR-10, the default), or one of
torchvision's ImageNet networks written in plain torch in bench/models.py (``resnet18``,
``resnet50``, ``mobilenetv2``: 224x224, 1000 classes, seeded random weights with non-trivial batch
norms), fed real CIFAR-10 images upsampled bilinearly to 224x224. Their "top-1" column is against
CIFAR-10 labels and means nothing for a random 1000-class network; "= fp32" (agreement with the
float model) is low for every int8 engine there too (a random network's top scores are nearly
tied: MobileNetV2's spread is about 0.15), so a broken engine shows only as agreement far below
the peers'. For them ``--isa`` defaults to ``native`` alone (one generation and compile per
instruction set, each taking longer on a large network).

The generated C is generated and compiled in a child process, with a time limit (``--c-timeout``
seconds) and an address-space limit (``--c-memory-gb``, which binds the compiler too); when it
fails or runs out of either, each of its rows says so and the peers are timed as usual. A line
before the tables gives its source size, generation and build times and peak memory.

Every engine runs the same network with the same weights on the same test images:

  torch fp32 eager     the float model in PyTorch (always measured: the baseline of every ratio)
  c                    the generated C library (int8), netquant's product: one row per --isa build,
                       named by the kernels it runs (amx, avx512-vnni, avx2 or portable)
  python               netquant's Python integer executor (only with --python-executor or --engines)
  ort                  ONNX Runtime int8: netquant's float ONNX export, static QDQ quantization
                       (QUInt8 activations, per-channel QInt8 weights, MinMax calibration)
  openvino             OpenVINO int8: the float ONNX, quantized by NNCF, compiled for CPU
  pt2e                 PyTorch's own int8 path: torch.export + PT2E with the X86InductorQuantizer
                       (torchao), then torch.compile (inductor, freezing on)

All int8 engines are calibrated on the same 200 training images (calibration_set(data)). The
peers are benchmark extras, not netquant dependencies: install them with
``pip install -e '.[bench]'`` (onnx, onnxruntime, openvino, nncf, torchao); a peer whose package
is missing is skipped with a line naming it. ``--engines`` limits the run to a subset (default:
every available engine; torch fp32 is always timed).

Each row prints images/s and its ratio to PyTorch fp32 measured in the same run (these machines
are noisy: compare ratios, not absolute numbers), the fraction of this CPU's int8 peak
(ResNet-20 is 40.8M MACs per image), the engine's top-1 accuracy on the test images it timed,
and its top-1 agreement with the float model on them (a broken peer shows up here).

The peak is measured in the same run, before each thread count's rows: bench/vnni_peak.c keeps
12 independent vpdpbusd chains per thread busy (64 MACs per instruction), so it runs at the
instruction's throughput, whatever the core: two per cycle on Intel's Ice Lake and newer, one
per cycle on AMD's Zen 4 (it splits 512-bit operations in two). The nominal Intel figure
(2 * 64 * GHz * threads) is printed beside it. An engine using AMX tiles, as oneDNN-based ones
may, can pass 100%.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import models as bench_models  # noqa: E402  (bench/models.py)
from netquant.codegen import CompiledNetwork, build, generate, plan  # noqa: E402
from netquant.data import calibration_set, load_cifar10, to_float  # noqa: E402
from netquant.models.analyze import analyze  # noqa: E402
from netquant.models.pretrained import load_pretrained  # noqa: E402
from netquant.quantizer import Quantizer  # noqa: E402

# engine key -> (label, packages it needs, pip line printed when one is missing)
PEERS = {
    "ort": ("ONNX Runtime int8", ("onnx", "onnxruntime"), "pip install onnx onnxruntime"),
    "openvino": ("OpenVINO int8", ("onnx", "openvino", "nncf"), "pip install onnx openvino nncf"),
    "pt2e": ("PyTorch PT2E x86 int8", ("torchao",), "pip install torchao"),
}
ENGINES = ["c", "c-unfused", "python", *PEERS]   # c-unfused: residual adds as steps of their own (the A/B of fuse_adds)
CIFAR_MODEL = "cifarnet-20-16"
MODELS = [CIFAR_MODEL, *bench_models.MODELS]


def cpu_ghz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) / 1000
    except OSError:
        pass
    return 2.75


def measured_peak(threads: int, tmp: str):
    """This CPU's AVX-512 VNNI MAC/s with ``threads`` threads (bench/vnni_peak.c), or None where
    it cannot be built or run (no compiler, no AVX-512 VNNI)."""
    import subprocess

    from netquant.codegen.build import BuildError, find_compiler
    exe = os.path.join(tmp, "vnni_peak")
    try:
        if not os.path.exists(exe):
            src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vnni_peak.c")
            subprocess.run([find_compiler(), "-O2", "-march=native", "-fopenmp", src, "-o", exe],
                           check=True, capture_output=True)
        out = subprocess.run([exe, str(threads)], check=True, capture_output=True, text=True).stdout
        return float(out.split()[-1])
    except (BuildError, OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


# --- netquant C: generated and built in a child process, so that a network too large for the
# generator or the compiler costs its own rows, not the run ---

def build_c_child(qpath: str, folder: str, isa: str, name: str, fuse: str = "fused") -> int:
    """In the child: load the saved quantizer, generate and build; print one JSON line."""
    q = Quantizer.load(qpath)
    t0 = time.perf_counter()
    gen = generate(q.quantize(), folder, name=name, isa=isa, fuse_adds=fuse == "fused")
    t1 = time.perf_counter()
    library = build(gen)
    t2 = time.perf_counter()
    sizes = sum(os.path.getsize(os.path.join(folder, f)) for f in gen.files)
    print(json.dumps({"library": str(library), "generate_s": t1 - t0, "build_s": t2 - t1, "source_bytes": sizes,
                      "python_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "compiler_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}))
    return 0


def build_c_isolated(qpath: str, folder: str, isa: str, name: str, timeout: float, memory_gb: float,
                     fuse: str = "fused") -> dict:
    """Generate and build in a child process (its own process group, so the compiler is stopped
    with it), under ``timeout`` seconds and ``memory_gb`` GiB of address space (0: no limit).
    Returns the child's JSON; raises RuntimeError saying what went wrong."""
    def limit():
        if memory_gb > 0:
            cap = int(memory_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_build-c", qpath, folder, isa, name, fuse],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the child's group: it and the compiler it started
        proc.communicate()
        raise RuntimeError(f"generate + build did not finish in {timeout:.0f} s (stopped)") from None
    if proc.returncode != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        if proc.returncode < 0:
            why = f"killed by {signal.Signals(-proc.returncode).name}"
        else:
            why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        if memory_gb > 0 and (proc.returncode < 0 or any(m in err for m in ("MemoryError", "out of memory",
                                                                             "Cannot allocate memory"))):
            why = f"{why} (out of memory? the limit is {memory_gb:g} GiB of address space: --c-memory-gb)"
        raise RuntimeError(f"generate + build failed: {why[:300]}")
    return json.loads(out.strip().splitlines()[-1])


def timeit(fn, x, min_seconds: float = 1.0) -> float:
    fn(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return n * len(x) / dt


# --- peers: each builder quantizes once and returns make(threads, batch) -> fn(images) -> scores ---

def onnxruntime_engine(onnx_path: str, calib: np.ndarray, tmp: str):
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"images": calib[i:i + 20]} for i in range(0, len(calib), 20)])

        def get_next(self):
            return next(self.it, None)

    # ORT names the scale of tensor T "T_scale", silently reusing an existing initializer of that
    # name (the export has a tensor "input" and a normalisation constant "input_scale"): give the
    # initializers a prefix no tensor name has before quantizing.
    model = onnx.load(onnx_path)
    names = {i.name: f"const_{i.name}" for i in model.graph.initializer}
    for i in model.graph.initializer:
        i.name = names[i.name]
    for n in model.graph.node:
        n.input[:] = [names.get(v, v) for v in n.input]
    renamed = os.path.join(tmp, "resnet20_ort_float.onnx")
    onnx.save(model, renamed)
    src = renamed
    try:  # ONNX Runtime's recommended pre-processing (shape inference, graph optimization)
        from onnxruntime.quantization.shape_inference import quant_pre_process
        src = os.path.join(tmp, "resnet20_ort_pre.onnx")
        quant_pre_process(renamed, src)
    except Exception as e:  # noqa: BLE001
        print(f"note: ONNX Runtime quant_pre_process failed ({e}); quantizing the raw export")
        src = renamed
    # Keep in float what netquant keeps in float: the input normalisation (the ops before the
    # first conv; quantizing its per-channel Mul also breaks ORT's bias quantization) and softmax.
    graph = onnx.load(src).graph
    first = next(i for i, n in enumerate(graph.node) if n.op_type in ("Conv", "Gemm", "MatMul"))
    exclude = [n.name for n in graph.node[:first]] + [n.name for n in graph.node if n.op_type == "Softmax"]
    qpath = os.path.join(tmp, "resnet20_ort_qdq.onnx")
    quantize_static(src, qpath, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
    sessions: dict = {}

    def make(threads: int, batch: int):
        if threads not in sessions:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sessions[threads] = ort.InferenceSession(qpath, so, providers=["CPUExecutionProvider"])
        s = sessions[threads]
        name = s.get_inputs()[0].name
        return lambda x: s.run(None, {name: x})[0]
    return make


def openvino_engine(onnx_path: str, calib: np.ndarray):
    import nncf
    import openvino as ov

    model = ov.convert_model(onnx_path)
    # one image per calibration item: NNCF's statistics are meant per sample
    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))])
    qmodel = nncf.quantize(model, dataset, subset_size=len(calib), target_device=nncf.TargetDevice.CPU)
    core = ov.Core()
    compiled: dict = {}

    def make(threads: int, batch: int):
        if threads not in compiled:
            # LATENCY: one stream that gets all INFERENCE_NUM_THREADS for the one synchronous
            # request on the whole batch. THROUGHPUT splits the threads into several streams
            # that only pay off with as many requests in flight; a single sync infer would
            # use one stream's share of the threads.
            # f32: the ops left in float run in fp32, as in every other engine here (on CPUs with
            # bf16 the default would run them in bf16).
            compiled[threads] = core.compile_model(qmodel, "CPU", {
                "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32"})
        cm = compiled[threads]
        req = cm.create_infer_request()
        out = cm.output(0)
        return lambda x: req.infer({0: x})[out]
    return make


ACTIVATIONS = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Hardtanh)


def separate_activation_calls(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Give every call of an activation module its own source partition, for the PT2E quantizer.

    torchvision's BasicBlock and Bottleneck call one ``self.relu`` two or three times. torch 2.13's
    export leaves ``source_fn_stack`` empty, so ``get_source_partitions`` groups nodes by their
    innermost ``nn_module_stack`` entry: both calls of ``layer1.0.relu`` (``relu__1``, ``relu__2``)
    form one partition with two outputs, and the X86InductorQuantizer stops with "Input partition
    has more than one output node". An activation module is one aten op and holds no state, so
    naming each call after its own node (``source_fn_stack = [(node.name, nn.ReLU)]``, which
    ``get_source_partitions`` reads first) splits the partition without changing what is fused."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack or node.meta.get("source_fn_stack"):
            continue
        cls = list(stack.values())[-1][1]
        if isinstance(cls, str):
            cls = next((a for a in ACTIVATIONS if cls == f"{a.__module__}.{a.__qualname__}"), None)
        if isinstance(cls, type) and issubclass(cls, ACTIVATIONS):
            node.meta["source_fn_stack"] = [(node.name, cls)]
    return gm


def pt2e_engine(net: torch.nn.Module, calib: np.ndarray):
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA-only kernels fail to load on CPU
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # a deprecation note on import
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._inductor")
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    except ImportError:  # older torch kept PT2E in torch.ao
        from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torch.ao.quantization.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    import torch._dynamo
    import torch._inductor.config

    torch._inductor.config.freezing = True       # as the x86 inductor quantization docs do
    torch._dynamo.config.automatic_dynamic_shapes = False   # a static kernel per batch size
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    example = torch.from_numpy(calib[:2])
    with torch.no_grad():
        ep = torch.export.export(net.eval(), (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        quantizer = X86InductorQuantizer()
        quantizer.set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(separate_activation_calls(ep.module()), quantizer)
        for i in range(0, len(calib), 20):
            prepared(torch.from_numpy(calib[i:i + 20]))
        converted = convert_pt2e(prepared)
    state = {"threads": None}

    def make(threads: int, batch: int):
        # inductor's CPU kernels bake the thread count in at compile time, and dynamo's guards
        # don't see it: start afresh when the thread count changes, compile per batch size
        if state["threads"] != threads:
            torch._dynamo.reset()
            state["threads"] = threads
        compiled = torch.compile(converted)

        def fn(x):
            with torch.no_grad():
                return compiled(torch.from_numpy(x)).numpy()
        fn(np.zeros((batch, *calib.shape[1:]), np.float32))  # compile, outside the timed region
        return fn
    return make


def main() -> int:
    if len(sys.argv) == 7 and sys.argv[1] == "--_build-c":   # the child of build_c_isolated
        return build_c_child(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=CIFAR_MODEL, choices=MODELS,
                    help="network to time (default: %(default)s, the shipped ResNet-20; the others are "
                         "torchvision's at 224x224, bench/models.py)")
    ap.add_argument("--data")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--isa", nargs="+", choices=("native", "avx512", "avx2", "scalar"),
                    help="C builds to time (native: this CPU's best, AMX where present; avx512: VNNI; "
                         "avx2: the kernels for x86 CPUs without AVX-512; default: native avx512 avx2 for "
                         "the shipped network, native for the others)")
    ap.add_argument("--calibration", type=int, default=200,
                    help="training images every int8 engine is calibrated on (default: %(default)s)")
    ap.add_argument("--c-timeout", type=float, default=900,
                    help="seconds the generation and build of one C library may take (default: %(default)s)")
    ap.add_argument("--c-memory-gb", type=float, default=8,
                    help="address space of the generation and the compiler, GiB (0: no limit; default: %(default)s)")
    ap.add_argument("--engines", nargs="+", choices=ENGINES,
                    help="engines to time besides torch fp32 (default: every available one; "
                         "'python' only with --python-executor; 'c-unfused', the C with its residual adds as "
                         "steps of their own (the A/B of the fused epilogue), only when named)")
    ap.add_argument("--python-executor", action="store_true", help="also time the Python integer executor")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds over all engines; the best is kept")
    ap.add_argument("--seconds", type=float, default=0.5, help="seconds per engine and round")
    args = ap.parse_args()
    if args.engines is None:
        engines = [e for e in ENGINES if e not in ("python", "c-unfused") or (e == "python" and args.python_executor)]
    else:
        engines = list(dict.fromkeys(args.engines + (["python"] if args.python_executor else [])))
    for key in [e for e in engines if e in PEERS]:
        label, packages, pip = PEERS[key]
        missing = [p for p in packages if importlib.util.find_spec(p) is None]
        if missing:
            print(f"skipped {label}: {pip}  (missing: {', '.join(missing)})")
            engines.remove(key)

    data = load_cifar10(args.data)
    cifar = args.model == CIFAR_MODEL
    isas = args.isa or (["native", "avx512", "avx2"] if cifar else ["native"])
    name = args.model.replace("-", "_")
    t0 = time.perf_counter()
    if cifar:
        net = load_pretrained().eval()
        calib_set = calibration_set(data, args.calibration)
        calib, calib_source = to_float(calib_set.images), calib_set.source
        test_x = to_float(data.test.images[:max(args.batches)])
    else:
        net = bench_models.MODELS[args.model]()
        calib, _, calib_source = bench_models.calibration_images(data, args.calibration)
        test_x = bench_models.upsampled(data.test.images[:max(args.batches)])
    size = test_x.shape[-1]
    macs = analyze(net, (3, size, size)).macs
    q = Quantizer(net, example=torch.from_numpy(calib[:2]))
    q.calibrate(calib, batch_size=100 if cifar else 20)   # 20 images at 224: a few hundred MB per tensor
    qnet = q.quantize()
    print(f"{args.model}: {sum(p.numel() for p in net.parameters()):,} parameters, {macs / 1e9:.2f}G MACs per "
          f"{size}x{size} image; made, captured and calibrated in {time.perf_counter() - t0:.0f} s")
    with tempfile.TemporaryDirectory() as tmp:
        makers: dict = {}   # label -> make(threads, batch) -> fn(images) -> scores
        failed: dict = {}   # label -> why it has no rows
        c_builds = [(isa, fuse) for isa in isas for fuse in ("fused", "unfused")
                    if ("c" if fuse == "fused" else "c-unfused") in engines]
        qpath = os.path.join(tmp, "quantizer.nq")
        if c_builds:
            q.save(qpath)
        for isa, fuse in c_builds:
            suffix = "" if fuse == "fused" else " (adds unfused)"
            try:
                info = build_c_isolated(qpath, os.path.join(tmp, f"{isa}-{fuse}"), isa, name, args.c_timeout,
                                        args.c_memory_gb, fuse)
                cnet = CompiledNetwork(info["library"], plan(qnet.qgraph, name))
            except Exception as e:  # noqa: BLE001  # a network the generator cannot take yet must not stop the peers
                failed[f"netquant C ({isa}){suffix}"] = f"{type(e).__name__}: {e}"
                print(f"failed netquant C ({isa}){suffix}: {type(e).__name__}: {e}")
                continue
            print(f"netquant C ({isa}, {cnet.kernels} kernels{suffix}): sources {info['source_bytes'] / 1e6:.1f} MB, "
                  f"generated in {info['generate_s']:.1f} s (Python peak RSS {info['python_rss_gb']:.2f} GB), "
                  f"built in {info['build_s']:.1f} s (compiler peak RSS {info['compiler_rss_gb']:.2f} GB)")

            def make_c(threads, batch, cnet=cnet):
                cnet.set_num_threads(threads)
                return cnet.predict
            # without AMX, the native build runs the same kernels as the avx512 one: time it once
            makers.setdefault(f"netquant C {cnet.kernels}{suffix}", make_c)
        if "python" in engines:
            makers["netquant Python int8"] = lambda threads, batch: qnet.run
        onnx_path = None
        if {"ort", "openvino"} & set(engines):
            from netquant.export import export_float_onnx
            onnx_path = os.path.join(tmp, f"{name}_float.onnx")
            export_float_onnx(q.graph, onnx_path)
        builders = {"ort": lambda: onnxruntime_engine(onnx_path, calib, tmp),
                    "openvino": lambda: openvino_engine(onnx_path, calib),
                    "pt2e": lambda: pt2e_engine(net, calib)}
        for key in [e for e in engines if e in PEERS]:
            label = PEERS[key][0]
            try:
                makers[label] = builders[key]()
            except Exception as e:  # noqa: BLE001  # a broken peer must not stop the others
                failed[label] = f"quantization: {type(e).__name__}: {e}"
                print(f"failed {label} (quantization): {type(e).__name__}: {e}")

        print(f"data: {data.test.source}" + ("" if cifar else f", upsampled bilinearly to {size}x{size}") +
              f"; calibration: {calib_source}")
        print(f"CPU: {os.cpu_count()} cores at ~{cpu_ghz():.2f} GHz; engines: {', '.join(['torch fp32 eager', *makers])}")
        for threads in args.threads:
            torch.set_num_threads(threads)
            nominal = 2 * 64 * cpu_ghz() * 1e9 * threads  # Intel's two VNNI instructions per cycle
            peak = measured_peak(threads, tmp)
            print(f"int8 peak, {threads} thread(s): " + (f"measured {peak / 1e9:.0f} G MAC/s ({macs * 1e-6:.1f}M MACs "
                  f"per image: {peak / macs:.0f} images/s at 100%); " if peak else "not measured; ") +
                  f"nominal 2 x 64 x {cpu_ghz():.2f} GHz = {nominal / 1e9:.0f} G MAC/s")
            peak = peak or nominal
            print(f"{'engine':24s} {'batch':>5s} {'threads':>7s} {'img/s':>9s} {'vs torch fp32':>13s} {'% int8 peak':>11s}"
                  f" {'top-1':>6s} {'= fp32':>6s}")
            for b in args.batches:
                x = test_x[:b]
                labels = data.test.labels[:b]
                xt = torch.from_numpy(x)
                with torch.no_grad():
                    ref = net(xt).argmax(1).numpy()
                fns = {"torch fp32 eager": lambda v: net(torch.from_numpy(v))}
                preds = {"torch fp32 eager": ref}
                for name, make in makers.items():
                    try:
                        fns[name] = make(threads, b)
                        preds[name] = np.asarray(fns[name](x)).argmax(1)
                    except Exception as e:  # noqa: BLE001  # a broken peer must not stop the others
                        fns.pop(name, None)
                        print(f"failed {name} (batch {b}, {threads} threads): {type(e).__name__}: {e}")
                # rounds over every engine in turn, the best round of each kept: a slow spell of
                # this shared machine then costs every engine alike instead of whichever ran in it
                best = dict.fromkeys(fns, 0.0)
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        with torch.no_grad():
                            best[name] = max(best[name], timeit(fn, x, args.seconds))
                base = best["torch fp32 eager"]
                for label, ips in best.items():
                    print(f"{label:24s} {len(x):5d} {threads:7d} {ips:9.0f} {ips / base:12.2f}x "
                          f"{100 * ips * macs / peak:10.1f}% {100 * np.mean(preds[label] == labels):5.1f}% "
                          f"{100 * np.mean(preds[label] == ref):5.1f}%")
                for label, why in failed.items():
                    print(f"{label:24s} {len(x):5d} {threads:7d} {'failed':>9s}  {why[:160]}")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
