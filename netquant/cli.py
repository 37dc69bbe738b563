"""The ``netquant`` command: thin commands over the public API.

Every command that reads CIFAR-10 takes ``--data`` (an archive, a folder, ``download`` or
``sample``); without it, ``$NETQUANT_DATA``; without that, the sample shipped in the package.
Every printed result names the data it came from.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("netquant")


def _data(args):
    from .data import load_cifar10

    return load_cifar10(args.data)


def _model(args):
    from .models.pretrained import load_pretrained

    return load_pretrained(args.model)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1))


# --- commands -------------------------------------------------------------------------------

def cmd_analyze(args) -> int:
    from .models.analyze import analyze

    a = analyze(_model(args))
    if args.json:
        _print_json(a.to_dict())
    else:
        print(a)
    return 0


def _evaluate(net, images) -> tuple[float, float]:
    """Top-1 (percent) of ``net`` on an ImageSet, and seconds taken."""
    from .models.train import evaluate

    t0 = time.time()
    return evaluate(net, images), time.time() - t0


def cmd_evaluate(args) -> int:
    from .data import validation_set

    net, data = _model(args), _data(args)
    subset = validation_set(data, args.count, args.seed)
    top1, secs = _evaluate(net, subset)
    if args.json:
        _print_json({"model": args.model, "top1": top1, "images": len(subset), "data": subset.source})
    else:
        print(f"{args.model}: top-1 {top1:.2f}% on {len(subset)} images ({subset.source}) in {secs:.1f} s")
    return 0


def cmd_tile(args) -> int:
    from .data import random_tile_png

    data = _data(args)
    split = data.train if args.split == "train" else data.test
    names = random_tile_png(split, args.out, args.count, args.seed)
    print(f"wrote {args.out}: {len(names)} random images (seed {args.seed}) from {split.source}: "
          f"{', '.join(names)}")
    return 0


def cmd_train(args) -> int:
    import torch

    from .models.pretrained import save_pretrained
    from .models.resnet import resnet
    from .models.train import TrainConfig, train
    from .progress import bar

    data = _data(args)
    if args.resume:
        meta = json.loads((Path(args.checkpoint_dir) / "last.json").read_text())
        cfg, spec = TrainConfig(**meta["config"]), meta["spec"]
        print(f"resuming {args.checkpoint_dir} at epoch {meta['epoch']}/{cfg.epochs}")
    else:
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          weight_decay=args.weight_decay, seed=args.seed, bf16=not args.no_bf16)
        spec = {"net_width": args.net_width, "num_units": args.num_units, "unit_type": args.unit_type}
    torch.manual_seed(cfg.seed)
    net = resnet(**spec)
    print(f"training {net.spec.name} on {data.train.source}, testing on {data.test.source}")
    report = train(net, data, cfg, args.checkpoint_dir, resume=args.resume, progress=bar("train"),
                   max_epochs_this_run=args.max_epochs)
    print(f"{net.spec.name}: {report}")
    if args.out and report.epochs == cfg.epochs:
        from .data.cifar10 import BINARY_MD5

        note = Path(args.checkpoint_dir) / "NOTE.md"
        card = save_pretrained(net, args.out, {
            "status": "final", "note": note.read_text() if note.exists() else "",
            "test_top1": report.test_top1, "test_images": len(data.test), "test_data": data.test.source,
            "epochs": report.epochs,
            "recipe": cfg.__dict__, "train_seconds": round(report.seconds),
            "dataset_md5": BINARY_MD5})
        print(f"wrote {card} and its weights")
    return 0


def cmd_demo(args) -> int:
    """The main job on the shipped defaults."""
    from .data import random_tile_png
    from .models.analyze import analyze

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net = _model(args)
    print(f"== {args.model}: analysis")
    print(analyze(net))
    data = _data(args)
    print(f"\n== data: {data.train.source}; {data.test.source}")
    names = random_tile_png(data.train, out / "tile.png", 20, args.seed)
    print(f"wrote {out / 'tile.png'}: 20 random training images: {', '.join(names)}")
    top1, secs = _evaluate(net, data.test)
    print(f"\n== float top-1 of {args.model}: {top1:.2f}% on {len(data.test)} images "
          f"({data.test.source}) in {secs:.1f} s")

    print(f"\n== calibration ({args.calibration} training images, seed {args.seed})")
    q = _quantizer(args, data)
    _print_calibration(q, full=False)
    for count in (args.validation, "all"):
        t0 = time.time()
        result = _validate(q, data, count, args.seed, ["top1", "top5"], str(count))
        print(f"\n== validation on {result.num_samples} images ({time.time() - t0:.1f} s)")
        print(result)
    fmem, qmem = q.learnable_memory()
    print(f"\n== learnable parameter memory: {fmem:,} bytes float -> {qmem:,} bytes int8 "
          f"({100 * (1 - qmem / fmem):.1f}% smaller)")
    q.save(out / "quantizer.nq")
    print(f"saved the quantizer to {out / 'quantizer.nq'} (load it with netquant.Quantizer.load)")

    print("\n== C code generation")
    import numpy as np

    from .data import to_float, validation_set

    gen, cnet = _generate_and_build(q, out / "c", "resnet20", "native")
    print(f"generated {', '.join(sorted(gen.files))} in {gen.folder}; built {gen.build['library']}; "
          f"report {gen.folder / 'report.html'}")
    val = validation_set(data, args.validation, args.seed)
    x = to_float(val.images)
    qnet = q.quantize()
    c_scores, py_scores = cnet.predict(x), qnet.run(x)
    same = bool(np.array_equal(c_scores.argmax(1), py_scores.argmax(1)))
    c_top1 = 100 * float((c_scores.argmax(1) == val.labels).mean())
    py_top1 = 100 * float((py_scores.argmax(1) == val.labels).mean())
    print(f"top-1 on {len(val)} validation images ({val.source}): generated C {c_top1:.2f}%, "
          f"Python executor {py_top1:.2f}% (same predictions: {same})")
    print(f"speed: generated C {_speed(cnet.predict, x, 3):.0f} images/s, Python executor "
          f"{_speed(qnet.run, x, 1):.0f} images/s (batch {len(x)}, this machine)")
    return 0


# --- quantization commands ----------------------------------------------------------------

def _scheme(args):
    from dataclasses import replace

    from .quant.config import target_config

    cfg = target_config(args.target)
    changes = {k: v for k, v in {"scale": args.scale, "weight_granularity": args.granularity,
                                 "activation_range": args.range_method}.items() if v}
    return replace(cfg, **changes) if changes else cfg


def _quantizer(args, data):
    """A calibrated Quantizer: loaded from --quantizer, or built and calibrated now."""
    from .data import calibration_set
    from .progress import bar
    from .quantizer import Quantizer

    if getattr(args, "quantizer", None):
        q = Quantizer.load(args.quantizer)
        print(f"loaded {args.quantizer}: {q}", file=sys.stderr)
    else:
        q = Quantizer(_model(args), target=args.target, config=_scheme(args))
        cal = calibration_set(data, args.calibration, args.seed)
        print(f"calibrating on {len(cal)} images ({cal.source})", file=sys.stderr)
        q.calibrate(cal, progress=bar("calibrate"))
    for layer in args.float or ():
        q.set_quantize(layer, False)
    return q


def _fmt_table(df) -> str:
    import pandas as pd

    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250,
                           "display.max_colwidth", 60, "display.float_format", "{:.6g}".format):
        return df.to_string(index=False)


MATLAB_COLUMNS = ["Optimized Layer Name", "Network Layer Name", "Learnables / Activations", "MinValue", "MaxValue"]


def _print_calibration(q, full: bool) -> None:
    table = q.calibration_table()
    cols = list(table.columns) if full else MATLAB_COLUMNS + ["Type", "Saturation %", "Underflow %", "Quantize"]
    print(_fmt_table(table[cols]))


def cmd_calibrate(args) -> int:
    data = _data(args)
    q = _quantizer(args, data)
    if args.json:
        _print_json(json.loads(q.calibration_table().to_json(orient="records")))
    else:
        _print_calibration(q, args.all_columns)
    if args.out:
        q.save(args.out)
        print(f"saved the quantizer to {args.out}")
    return 0


def _validate(q, data, count, seed, metrics, label):
    from .data import validation_set
    from .progress import bar

    val = validation_set(data, count, seed)
    result = q.validate(val, metrics=metrics, progress=bar(f"validate {label}"))
    return result


def cmd_validate(args) -> int:
    data = _data(args)
    q = _quantizer(args, data)
    result = _validate(q, data, args.validation, args.seed, args.metric or ["top1", "top5"], "")
    if args.json:
        _print_json({"num_samples": result.num_samples, "source": result.source, "agreement": result.agreement,
                     "top1_difference": result.top1_difference, "mcnemar_p": result.mcnemar_p,
                     "metrics": {k: json.loads(v.to_json(orient="records")) for k, v in result.metrics.items()}})
    else:
        print(result)
    return 0


def cmd_quantize(args) -> int:
    data = _data(args)
    q = _quantizer(args, data)
    details = q.quantization_details()
    fmem, qmem = q.learnable_memory()
    if args.json:
        _print_json({"layers": json.loads(details.to_json(orient="records")), "float_bytes": fmem, "int8_bytes": qmem})
    else:
        print(_fmt_table(details))
        print(f"learnable parameter memory: {fmem:,} bytes float -> {qmem:,} bytes quantized "
              f"({100 * (1 - qmem / fmem):.1f}% smaller)")
    out = args.out or "quantizer.nq"
    q.save(out)
    print(f"saved the quantizer to {out}")
    return 0


def _generate_and_build(q, out, name, isa, target="c", arch="sm_90", tensor_cores=False):
    """Generate and build; the C library is also loaded (a CUDA one needs a GPU to load)."""
    from .codegen import build, generate, load
    from .progress import bar

    prov = f"network {q.name}; calibration: {q.provenance.get('calibration', {}).get('source', 'n/a')}"
    gen = generate(q.quantize(), out, name=name, target=target, isa=isa, provenance=prov, progress=bar("generate"),
                   arch=arch, tensor_cores=tensor_cores)
    if target == "cuda":
        build(gen, progress=bar("nvcc"))
        return gen, None
    net = load(gen, progress=bar("compile"))
    return gen, net


def cmd_codegen(args) -> int:
    data = _data(args)
    q = _quantizer(args, data)
    gen, net = _generate_and_build(q, args.out, args.name, args.isa, args.codegen_target, args.arch,
                                   args.tensor_cores)
    print(f"generated {args.codegen_target} sources in {gen.folder}: " +
          ", ".join(f"{f} ({n} lines)" for f, n in sorted(gen.files.items())))
    print(f"built {gen.build['library']} with: {gen.build['command']}"
          f"{' (cached)' if gen.build.get('cached') else ''}")
    print(f"report: {gen.folder / 'report.html'}")
    return 0


def _speed(fn, x, repeats: int = 1) -> float:
    """Images per second of fn(x), best of ``repeats`` runs."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return len(x) / best


def cmd_export_onnx(args) -> int:
    from .export import export_float_onnx, export_quantized_onnx

    try:
        import onnx  # noqa: F401  (needed to write the file; ask before calibrating)
    except ImportError:
        print("netquant export-onnx: error: needs the onnx package: pip install 'netquant[onnx]'", file=sys.stderr)
        return 2
    if args.float_network:
        if args.quantizer:
            from .quantizer import Quantizer

            graph = Quantizer.load(args.quantizer).graph
            print(f"loaded {args.quantizer}")
        else:
            from .ir.capture import capture

            graph = capture(_model(args))
        model = export_float_onnx(graph, args.out)
        what = f"the float network ({graph.source or args.model})"
    else:
        data = None if args.quantizer else _data(args)   # a saved quantizer needs no images
        q = _quantizer(args, data)
        model = export_quantized_onnx(q.quantize(), args.out)
        what = f"the int8 network of {q.name} in QDQ form"
    ops = sorted({n.op_type for n in model.graph.node})
    dims = ", ".join(str(d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
    print(f"wrote {args.out}: {what}, ONNX opset {model.opset_import[0].version}, input images (N, {dims}) "
          f"float32, output scores; {len(model.graph.node)} nodes ({', '.join(ops)})")
    return 0


def cmd_app(args) -> int:
    from .app.server import serve

    serve(args.host, args.port, open_browser=not args.no_browser, data=args.data)
    return 0


# --- parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netquant", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, func, help, data=True, model=True):
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(func=func)
        if data:
            c.add_argument("--data", help="CIFAR-10 archive or folder, 'download' or 'sample' "
                                          "(default: $NETQUANT_DATA, else the embedded sample)")
        if model:
            c.add_argument("--model", default="cifarnet-20-16", help="shipped network (default: %(default)s)")
        c.add_argument("--seed", type=int, default=0, help="seed of random subsets (default: %(default)s)")
        return c

    c = command("analyze", cmd_analyze, "print the layer table and totals of a network", data=False)
    c.add_argument("--json", action="store_true")

    c = command("evaluate", cmd_evaluate, "float top-1 of a network on CIFAR-10 test images")
    c.add_argument("--count", default="all", type=_count, help="test images: a number or 'all' (default)")
    c.add_argument("--json", action="store_true")

    c = command("tile", cmd_tile, "write a PNG tile of random images", model=False)
    c.add_argument("--out", default="tile.png")
    c.add_argument("--count", type=int, default=20)
    c.add_argument("--split", choices=("train", "test"), default="train")

    c = command("train", cmd_train, "train a CIFAR residual network with checkpoints", model=False)
    c.add_argument("--net-width", type=int, default=16)
    c.add_argument("--num-units", type=int, default=9)
    c.add_argument("--unit-type", choices=("standard", "bottleneck"), default="standard")
    c.add_argument("--epochs", type=int, default=120)
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--lr", type=float, default=0.1)
    c.add_argument("--weight-decay", type=float, default=5e-4)
    c.add_argument("--no-bf16", action="store_true", help="train in float32 even where bfloat16 is supported")
    c.add_argument("--checkpoint-dir", default="checkpoints/run", help="checkpoint folder (default: %(default)s)")
    c.add_argument("--resume", action="store_true", help="continue from the checkpoint (its settings win)")
    c.add_argument("--max-epochs", type=int, help="stop after this many epochs in this run")
    c.add_argument("--out", help="when training completes, write <name>.safetensors and <name>.json here")

    def quant_options(c, validation=False, env_flag="--target"):
        c.add_argument(env_flag, dest="target", default="gpu", choices=("gpu", "cpu", "fpga", "matlab"),
                       help="execution environment: picks the default scheme (default: %(default)s)")
        c.add_argument("--scale", choices=("float", "pow2"), help="override the target's scale kind")
        c.add_argument("--granularity", choices=("per_channel", "per_tensor"), help="weight scale granularity")
        c.add_argument("--range-method", choices=("minmax", "percentile", "entropy", "mse"),
                       help="activation range method")
        c.add_argument("--calibration", type=int, default=200, help="calibration images from the training set "
                                                                      "(default: %(default)s)")
        c.add_argument("--float", dest="float", action="append", metavar="LAYER",
                       help="keep LAYER in float (repeatable)")
        if validation:
            c.add_argument("--validation", type=_count, default=50,
                           help="validation images from the test set: a number or 'all' (default: %(default)s)")

    c = command("calibrate", cmd_calibrate, "calibrate a network and print the calibration table")
    quant_options(c)
    c.add_argument("--all-columns", action="store_true", help="print every column")
    c.add_argument("--json", action="store_true")
    c.add_argument("--out", help="save the calibrated quantizer to this file")

    c = command("validate", cmd_validate, "compare float and int8 on validation images")
    quant_options(c, validation=True)
    c.add_argument("--quantizer", help="a saved quantizer file instead of calibrating now")
    c.add_argument("--metric", action="append", help="top1, top5 or module:function (repeatable)")
    c.add_argument("--json", action="store_true")

    c = command("quantize", cmd_quantize, "calibrate, quantize, print the details and save the quantizer")
    quant_options(c)
    c.add_argument("--quantizer", help="a saved quantizer file instead of calibrating now")
    c.add_argument("--out", help="quantizer file to write (default: quantizer.nq)")
    c.add_argument("--json", action="store_true")

    c = command("codegen", cmd_codegen, "generate C for the int8 network, build it, write the report")
    quant_options(c, env_flag="--environment")
    c.add_argument("--quantizer", help="a saved quantizer file instead of calibrating now")
    c.add_argument("--target", dest="codegen_target", default="c", choices=("c", "cuda"), help="code generation target")
    c.add_argument("--arch", default="sm_90", help="GPU architecture for --target cuda (default: %(default)s)")
    c.add_argument("--tensor-cores", action="store_true",
                   help="--target cuda, sm_80 and newer: convolutions on int8 tensor cores (mma.sync) instead of dp4a")
    c.add_argument("--isa", default="native", choices=("native", "avx512", "avx2", "scalar"),
                   help="native: this CPU's best kernels (AMX, else AVX-512 VNNI); avx512: VNNI even where AMX "
                        "is present; scalar: the portable path")
    c.add_argument("--name", default="net", help="C prefix of the exported functions (default: %(default)s)")
    c.add_argument("--out", default="codegen", help="folder for the sources (default: %(default)s)")

    c = command("export-onnx", cmd_export_onnx, "write the int8 network (QDQ) or, with --float-network, the float "
                                                 "network as an ONNX file")
    quant_options(c)
    c.add_argument("--out", required=True, help="ONNX file to write")
    c.add_argument("--float-network", dest="float_network", action="store_true",
                   help="export the float network instead of the int8 one")
    c.add_argument("--quantizer", help="a saved quantizer file instead of calibrating now")

    c = command("app", cmd_app, "the Deep Network Quantizer app in the browser (local server)", model=False)
    c.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    c.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1 only)")
    c.add_argument("--no-browser", action="store_true", help="print the URL without opening a browser")

    c = command("demo", cmd_demo, "the main job: analyse, load data, tile, evaluate, calibrate, validate, save")
    quant_options(c, validation=True)
    c.add_argument("--out", default="netquant-out", help="folder for the files it writes")
    return p


def _count(text: str):
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .data.cifar10 import DataError

    try:
        return args.func(args)
    except (DataError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"netquant {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
