"""The ``netquant`` command: thin commands over the public API.

``--data`` is CIFAR-10 (an archive, a folder, ``download`` or ``sample``), your own images (an
image folder with one sub-folder per class, a folder with ``train/`` and ``val/`` image folders,
a ``.zip`` of either, or a ``.npz``); without it, ``$NETQUANT_DATA``; without that, the CIFAR-10
sample shipped in the package. Images are resized and centre-cropped to the network's input.
``--model`` is a ``.onnx`` file, a netquant ``.safetensors`` file or a shipped network name;
``--mean``/``--std``/``--channel-order``/``--value-range`` say what input the model expects.
Every argument is checked before any work starts; every printed result names the data it came from.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger("netquant")
DEFAULT_MODEL = "cifarnet-20-16"
DEFAULT_CALIBRATION, DEFAULT_VALIDATION = 200, 50   # MATLAB's datastore sizes
DEFAULT_SEARCH = 1000   # test images the accuracy-budget search measures on (0.1 points = 1 image)
SPEC_FLAGS = {"mean": "--mean", "std": "--std", "channel_order": "--channel-order", "value_range": "--value-range"}


from .errors import ArgumentError, InputError, NetquantError  # noqa: E402  (arguments are checked before any work starts)
from .quant.config import (ARM_ISAS, CODEGEN_TARGETS, CROSS_TRIPLES, ENGINES, GRANULARITIES,  # noqa: E402
                           ISA_FLAGS, MICRO_CPUS, RANGE_METHODS, SCALES, TARGETS, image_count)


# --- arguments ----------------------------------------------------------------------------------

def _check_args(args) -> None:
    """Every check that needs no loading: conflicting options, missing files, bad numbers."""
    from .data.cifar10 import DATA_ENV

    quantizer, model = getattr(args, "quantizer", None), getattr(args, "model", None)
    if quantizer and model:
        raise ArgumentError("--quantizer and --model together: a saved quantizer holds its network; pass one of them")
    if quantizer:
        if not Path(quantizer).is_file():
            raise ArgumentError(f"{quantizer}: no such file (expected a quantizer file written by "
                                f"netquant quantize or calibrate --out)")
        given = [flag for key, flag in {**SPEC_FLAGS, "input_size": "--input-size"}.items()
                 if getattr(args, key, None) is not None]
        if given:
            raise ArgumentError(f"{', '.join(given)} with --quantizer: a saved quantizer keeps the input spec and "
                                f"size it was made with; pass them with --model instead")
    if hasattr(args, "model"):
        from .models.files import resolve_network

        args.network = None if quantizer else resolve_network(model or DEFAULT_MODEL)
    data = getattr(args, "data", None)
    if data is not None and data not in ("sample", "download") and not Path(data).exists():
        raise ArgumentError(f"{data}: no such file or folder (--data: a CIFAR-10 archive or folder, an image folder, "
                            f"a .zip of one, a .npz, 'sample' or 'download'; default ${DATA_ENV})")
    mean, std = getattr(args, "mean", None), getattr(args, "std", None)
    if mean is not None and std is not None and len(mean) != len(std):
        raise ArgumentError(f"--mean has {len(mean)} values and --std {len(std)}: give one per input channel")
    if std is not None and min(std) <= 0:
        raise ArgumentError(f"--std: every value must be > 0, got {' '.join(map(str, std))}")
    vr = getattr(args, "value_range", None)
    if vr is not None and not vr[0] < vr[1]:
        raise ArgumentError(f"--value-range: expected LOW HIGH with LOW < HIGH, got {vr[0]:g} {vr[1]:g}")
    size = getattr(args, "input_size", None)
    if size is not None and min(size) <= 0:
        raise ArgumentError(f"--input-size: expected two positive integers H W, got {size[0]} {size[1]}")
    resize = getattr(args, "resize", None)
    if resize is not None and resize <= 0:
        raise ArgumentError(f"--resize: expected a positive shorter side in pixels, got {resize}")
    names = getattr(args, "class_names", None)
    if names is not None:
        args.class_name_list = _read_class_names(names)
    if getattr(args, "workers", None) is not None and args.workers <= 0:
        raise ArgumentError(f"--workers: expected a positive number of processes, got {args.workers}")
    if getattr(args, "max_drop", None) is not None and not args.max_drop >= 0:
        raise ArgumentError(f"--max-drop: expected a metric drop >= 0 (e.g. 0.1), got {args.max_drop}")
    if getattr(args, "calibration", None) is not None and args.calibration <= 0:
        raise ArgumentError(f"--calibration: expected a positive number of images, got {args.calibration}")
    _check_late_args(args)


# commands whose --out is one file (the others take a folder)
OUT_FILE_COMMANDS = ("calibrate", "quantize", "export-onnx", "tile")


def _check_late_args(args) -> None:
    """The checks of arguments that are otherwise used only after the long part of a command
    (calibration, inference): metrics, counts and output paths."""
    if args.command == "tile" and args.count <= 0:
        raise ArgumentError(f"--count: expected a positive number of images, got {args.count}")
    metrics = getattr(args, "metric", None)
    if metrics:
        from .metrics import resolve_metric

        for m in metrics:
            resolve_metric(m)   # MetricError naming the metric, before any work
    for key in ("search_metric", "sensitivity_metric"):
        if getattr(args, key, None):
            from .metrics import resolve_metric

            resolve_metric(getattr(args, key))
    if args.command == "demo" or args.command == "codegen" and args.codegen_target == "c" and not args.cross:
        from .codegen.build import find_compiler

        find_compiler()   # BuildError naming what to install, before calibrating or generating
    out = getattr(args, "out", None)
    if args.command == "quantize" and out is None:
        out = "quantizer.nq"
    if out is not None:
        _check_out(out, args.command in OUT_FILE_COMMANDS)


def _check_out(out, is_file: bool) -> None:
    """--out must be writable: a file's folder exists and is a folder (the file itself not a
    folder); a folder, or its nearest existing parent, is a writable folder."""
    p = Path(out)
    if is_file:
        if p.is_dir():
            raise ArgumentError(f"--out {out}: is a folder, expected a file name")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise ArgumentError(f"--out {out}: {parent} is not an existing folder")
    else:
        if p.exists() and not p.is_dir():
            raise ArgumentError(f"--out {out}: is a file, expected a folder")
        parent = p
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ArgumentError(f"--out {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArgumentError(f"--out {out}: the folder {parent} is not writable")


def _read_class_names(path) -> tuple:
    p = Path(path)
    if not p.exists():
        raise ArgumentError(f"{path}: no such file (--class-names: a text file, one class name per line, "
                            f"in the order of the model's outputs)")
    names = tuple(line.strip() for line in p.read_text().splitlines() if line.strip())
    if not names:
        raise ArgumentError(f"{path}: no class names in it (one per line, in the order of the model's outputs)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ArgumentError(f"{path}: class names repeat: {', '.join(dup[:5])}")
    return names


@dataclass(frozen=True)
class _Net:
    """The network a command works on: a torch module (shipped or safetensors) or an ONNX graph."""

    name: str
    module: object = None      # torch.nn.Module, or None for ONNX
    graph: object = None       # the imported Graph for ONNX, else None (captured on demand)


def _network(args) -> _Net:
    from .models.files import load_module, load_network

    source = args.network
    if source.kind == "onnx":
        graph, name = load_network(source.path, input_shape=args.input_size)
        return _Net(name, graph=graph)
    module = load_module(source)
    return _Net(getattr(module, "card", {}).get("name", source.name), module=module)


def _module_shape(args) -> tuple:
    """(C, H, W) a torch network is run at: --input-size, else CIFAR's 3x32x32."""
    return (3, *args.input_size) if args.input_size else (3, 32, 32)


def _input_spec(args, shape):
    """The InputSpec the flags describe, or None when none is given."""
    if all(getattr(args, key, None) is None for key in SPEC_FLAGS):
        return None
    from .ir.input_spec import InputSpec

    return InputSpec(tuple(shape), channel_order=args.channel_order or "RGB",
                     value_range=tuple(args.value_range) if args.value_range else (0.0, 1.0),
                     mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None)


def _float_graph(args, net: _Net):
    """The float graph of ``net`` with the input spec applied (it takes netquant images)."""
    import torch

    from .ir.capture import capture
    from .ir.input_spec import apply_input_spec

    if net.graph is not None:
        return apply_input_spec(net.graph, _input_spec(args, net.graph.input.shape))
    spec = _input_spec(args, _module_shape(args))
    x = torch.rand(2, *_module_shape(args), generator=torch.Generator().manual_seed(0))
    return apply_input_spec(capture(net.module, spec.apply(x) if spec else x), spec)


@dataclass(frozen=True)
class _Data:
    """The sets of --data, and the size the images drawn from them are brought to.

    Image files are resized while they are decoded (``size`` None here); decoded arrays
    (CIFAR-10, .npz) are resized only when a subset is drawn (:meth:`sized`), so 200
    calibration images of CIFAR-10 for a 224x224 network do not resize all 60,000."""

    train: object
    test: object
    size: Optional[tuple] = None
    resize: Optional[int] = None

    def sized(self, images):
        """``images`` (drawn from train or test) at the network's input size."""
        return images if self.size is None else images.resized(self.size, self.resize)


def _data(args, shape=None, outputs: Optional[int] = None) -> _Data:
    """The data of --data for a network taking ``shape`` (C, H, W), when given, with its labels
    checked against the network's ``outputs``."""
    from .data import open_data
    from .data.folder import reads_image_files
    from .progress import bar

    given = getattr(args, "class_name_list", None)
    size, resize = (tuple(shape[1:]) if shape else None), getattr(args, "resize", None)
    decoded = size is not None and reads_image_files(args.data)
    data = open_data(args.data, size=size if decoded else None, resize=resize if decoded else None,
                     class_names=given, channels=shape[0] if shape and shape[0] in (1, 3) else 3,
                     progress=bar("read images"))
    if outputs is not None:
        _check_classes(data, outputs, given is not None)
    return _Data(data.train, data.test, None if decoded else size, resize)


def _data_for(args, graph):
    """:func:`_data` for the network ``graph``."""
    import numpy as np

    return _data(args, graph.input.shape, int(np.prod(graph.node(graph.output).shape)))


def _check_classes(data, outputs: int, names_given: bool) -> None:
    """The labels must be class numbers of the network's output; a folder with fewer classes than
    the network gets a note, since its sorted folder names may not follow the model's order."""
    for split in {id(data.train): data.train, id(data.test): data.test}.values():
        top = int(split.labels.max()) if len(split) else -1
        if top >= outputs:
            raise InputError(f"{split.source}: label {top} ({split.class_name(top)}) but the network has {outputs} "
                             f"outputs; give the model's class order with --class-names FILE")
        if not names_given and split.class_names is not None and len(split.class_names) < outputs:
            print(f"note: {split.num_classes} classes in {split.source} and {outputs} network outputs: labels are the "
                  f"positions of the sorted folder names ({split.class_names[0]} = 0, ...); if the model orders its "
                  f"classes otherwise, pass --class-names FILE", file=sys.stderr)


def _model(args):
    """The torch module of a shipped or safetensors network (commands that need one)."""
    from .models.files import load_module

    if args.network.kind == "onnx":
        raise ArgumentError(f"netquant {args.command} needs a torch network (a shipped name or .safetensors); "
                            f"{args.network.path} is ONNX")
    return load_module(args.network)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1))


# --- commands -------------------------------------------------------------------------------

def cmd_analyze(args) -> int:
    net = _network(args)
    if net.module is not None:
        from .models.analyze import analyze

        a = analyze(net.module, _module_shape(args))
        if args.json:
            _print_json(a.to_dict())
        else:
            print(a)
        return 0
    d = _graph_summary(net.graph)
    if args.json:
        _print_json(d)
    else:
        print(net.graph)
        print(f"{d['network']}: {d['nodes']} nodes, {d['weighted_layers']} conv/fc layers, {d['parameters']:,} "
              f"parameters, {d['macs']:,} MACs per image ({d['macs'] / 1e6:.1f}M), input "
              f"{'x'.join(map(str, d['input_shape']))}, {d['outputs']} outputs")
    return 0


def _graph_summary(graph) -> dict:
    """Totals of an imported graph: a conv with output (C, H, W) and weight (C, C_in/g, kh, kw)
    does C*H*W * (C_in/g)*kh*kw MACs; a fully connected layer does out*in."""
    import numpy as np

    from .ir.graph import WEIGHTED_OPS

    params = sum(int(np.size(v)) for n in graph.nodes for k, v in n.params.items() if k in ("weight", "bias"))
    macs = 0
    for n in graph.nodes:
        if n.op in WEIGHTED_OPS:
            w = n.params["weight"]
            macs += int(np.prod(n.shape)) * int(np.prod(w.shape[1:])) if w.ndim == 4 else int(w.size)
    return {"network": graph.source, "nodes": len(graph.nodes), "parameters": params, "macs": macs,
            "weighted_layers": sum(n.op in WEIGHTED_OPS for n in graph.nodes),
            "input_shape": list(graph.input.shape), "outputs": int(np.prod(graph.node(graph.output).shape))}


def _evaluate(net, images) -> tuple[float, float]:
    """Top-1 (percent) of a torch network on an ImageSet, and seconds taken."""
    from .models.train import evaluate

    t0 = time.time()
    return evaluate(net, images), time.time() - t0


def _evaluate_graph(graph, images, batch_size: int = 250) -> tuple[float, float]:
    """Top-1 (percent) of a float graph on an ImageSet (the float executor), and seconds taken."""
    import torch

    from .data import batches
    from .ir.float_exec import run_float
    from .progress import bar

    t0, correct, progress = time.time(), 0, bar("evaluate")
    for start, x in batches(images.images, batch_size):
        scores = run_float(graph, torch.from_numpy(x), keep=())[graph.output].numpy()
        correct += int((scores.argmax(1) == images.labels[start:start + len(x)]).sum())
        progress(start + len(x), len(images), "float inference")
    return 100.0 * correct / max(len(images), 1), time.time() - t0


def cmd_evaluate(args) -> int:
    from .data import validation_set

    net = _network(args)
    if net.module is not None and _input_spec(args, _module_shape(args)) is None:
        data = _data(args, _module_shape(args), _outputs(net.module, _module_shape(args)))
        subset = data.sized(validation_set(data, args.count, args.seed))
        top1, secs = _evaluate(net.module, subset)
    else:
        graph = _float_graph(args, net)
        data = _data_for(args, graph)
        subset = data.sized(validation_set(data, args.count, args.seed))
        top1, secs = _evaluate_graph(graph, subset)
    if args.json:
        _print_json({"model": net.name, "top1": top1, "images": len(subset), "data": subset.source})
    else:
        print(f"{net.name}: top-1 {top1:.2f}% on {len(subset)} images ({subset.source}) in {secs:.1f} s")
    return 0


def _outputs(module, shape) -> int:
    """The number of class scores of a torch module at input ``shape``."""
    import torch

    with torch.no_grad():
        return int(module(torch.zeros(1, *shape)).shape[1])


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
    name = net.card.get("name", args.network.name)
    print(f"== {name}: analysis")
    print(analyze(net, _module_shape(args)))
    data = _data(args, _module_shape(args), _outputs(net, _module_shape(args)))
    print(f"\n== data: {data.train.source}; {data.test.source}")
    names = random_tile_png(data.train, out / "tile.png", 20, args.seed)
    print(f"wrote {out / 'tile.png'}: 20 random training images: {', '.join(names)}")
    top1, secs = _evaluate(net, data.sized(data.test))
    print(f"\n== float top-1 of {name}: {top1:.2f}% on {len(data.test)} images "
          f"({data.test.source}) in {secs:.1f} s")

    print(f"\n== calibration ({_count_of(args.calibration, DEFAULT_CALIBRATION, data.train)} training images, "
          f"seed {args.seed})")
    q = _new_quantizer(args, _Net(name, module=net))
    _calibrate(args, q, data)
    for layer in args.float or ():
        q.set_quantize(layer, False)
    _print_calibration(q, full=False)
    for count in (_count_of(args.validation, DEFAULT_VALIDATION, data.test), "all"):
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
    val = data.sized(validation_set(data, _count_of(args.validation, DEFAULT_VALIDATION, data.test), args.seed))
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
    # the accuracy tools (netquant.accuracy), applied while calibrating
    changes.update({k: True for k in ("cle", "bias_correction", "adaround") if getattr(args, k, False)})
    if getattr(args, "weight_bits", None):
        changes["weight_bits"] = args.weight_bits
    return replace(cfg, **changes) if changes else cfg


def _count_of(count, default: int, images):
    """The images to draw: the count asked for, else the default (MATLAB's 200 or 50), or every
    image of a set smaller than that."""
    if count is not None:
        return count
    return default if len(images) > default else "all"


def _new_quantizer(args, net: _Net):
    """A Quantizer for ``net`` with the input spec of the flags (not yet calibrated)."""
    import torch

    from .quantizer import Quantizer

    kw = {"target": args.target, "config": _scheme(args), "name": net.name}
    if net.graph is not None:
        spec = _input_spec(args, net.graph.input.shape)
        return Quantizer(graph=net.graph, input_spec=spec, **kw) if spec else Quantizer(graph=net.graph, **kw)
    spec = _input_spec(args, _module_shape(args))
    if spec is not None:
        return Quantizer(net.module, input_spec=spec, **kw)
    example = torch.rand(2, *_module_shape(args), generator=torch.Generator().manual_seed(0)) if args.input_size else None
    return Quantizer(net.module, example=example, **kw)


def _calibrate(args, q, data) -> None:
    from .data import calibration_set
    from .progress import bar

    cal = data.sized(calibration_set(data, _count_of(args.calibration, DEFAULT_CALIBRATION, data.train), args.seed))
    print(f"calibrating on {len(cal)} images ({cal.source})", file=sys.stderr)
    q.calibrate(cal, progress=bar("calibrate"))


def _quantizer(args, need_data: bool = True):
    """(A calibrated Quantizer, the data): loaded from --quantizer, or built from --model and
    calibrated now; the data is read at the network's input size."""
    from .quantizer import Quantizer

    if getattr(args, "quantizer", None):
        q = Quantizer.load(args.quantizer)
        print(f"loaded {args.quantizer}: {q}", file=sys.stderr)
        data = _data_for(args, q.graph) if need_data else None
    else:
        q = _new_quantizer(args, _network(args))
        data = _data_for(args, q.graph)
        _calibrate(args, q, data)
    for layer in args.float or ():
        q.set_quantize(layer, False)
    return q, data


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
    q, _ = _quantizer(args)
    if args.json:
        _print_json(json.loads(q.calibration_table().to_json(orient="records")))
    else:
        _print_calibration(q, args.all_columns)
    if args.out:
        q.save(args.out)
        print(f"saved the quantizer to {args.out}")
    return 0


def _validate(q, data, count, seed, metrics, label, engine="python"):
    from .data import validation_set
    from .progress import bar

    val = data.sized(validation_set(data, count, seed))
    result = q.validate(val, metrics=metrics, progress=bar(f"validate {label}"), engine=engine)
    return result


def cmd_validate(args) -> int:
    q, data = _quantizer(args)
    count = _count_of(args.validation, DEFAULT_VALIDATION, data.test)
    result = _validate(q, data, count, args.seed, args.metric or ["top1", "top5"], "", args.engine)
    if args.json:
        _print_json({"num_samples": result.num_samples, "source": result.source, "engine": result.engine,
                     "agreement": result.agreement,
                     "top1_difference": result.top1_difference, "mcnemar_p": result.mcnemar_p,
                     "metrics": {k: json.loads(v.to_json(orient="records")) for k, v in result.metrics.items()}})
    else:
        print(result)
    return 0


def cmd_sensitivity(args) -> int:
    from .accuracy.sensitivity import format_table
    from .data import validation_set
    from .progress import bar

    q, data = _quantizer(args)
    val = data.sized(validation_set(data, _count_of(args.validation, DEFAULT_VALIDATION, data.test), args.seed))
    table = q.sensitivity(val, metric=args.sensitivity_metric, progress=bar("sensitivity"), workers=args.workers,
                          ray_address=args.ray)
    if args.json:
        _print_json({**table.attrs, "layers": json.loads(table.to_json(orient="records"))})
    else:
        print(format_table(table))
    return 0


def cmd_quantize(args) -> int:
    q, data = _quantizer(args)
    if args.max_drop is not None:
        q = _auto_precision(args, q, data)
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


def _auto_precision(args, q, data):
    """``quantize --max-drop``: the accuracy-budget search on test images; prints the chosen
    configuration and the Pareto front, returns the chosen quantizer."""
    from .accuracy.search import format_front
    from .data import validation_set
    from .progress import bar

    val = data.sized(validation_set(data, _count_of(args.validation, DEFAULT_SEARCH, data.test), args.seed))
    print(f"searching per-layer precision on {len(val)} images ({val.source}), budget: {args.search_metric} "
          f"at most {args.max_drop:g} below float", file=sys.stderr)
    result = q.auto_precision(val, max_drop=args.max_drop, metric=args.search_metric, progress=bar("auto precision"),
                              workers=args.workers, ray_address=args.ray)
    print(format_front(result))
    return result.quantizer


def _generate_and_build(q, out, name, isa, target="c", arch="sm_90", tensor_cores=None, cross=None,
                        cpu="cortex-m4"):
    """Generate and build; the C library is also loaded (a CUDA one needs a GPU to load; a cross
    or micro build runs on its board or under QEMU, not in this process)."""
    from .codegen import build, generate, load
    from .progress import bar

    prov = f"network {q.name}; calibration: {q.provenance.get('calibration', {}).get('source', 'n/a')}"
    gen = generate(q.quantize(), out, name=name, target=target, isa=isa, provenance=prov, progress=bar("generate"),
                   arch=arch, tensor_cores=tensor_cores, cross=cross, cpu=cpu)
    if target in ("cuda", "micro") or cross:
        build(gen, progress=bar("nvcc" if target == "cuda" else "cross-compile"))
        return gen, None
    net = load(gen, progress=bar("compile"))
    return gen, net


def cmd_codegen(args) -> int:
    q, _ = _quantizer(args, need_data=False)
    gen, net = _generate_and_build(q, args.out, args.name, args.isa, args.codegen_target, args.arch,
                                   args.tensor_cores, args.cross, args.cpu)
    print(f"generated {args.codegen_target} sources in {gen.folder}: " +
          ", ".join(f"{f} ({n} lines)" for f, n in sorted(gen.files.items())))
    if gen.micro is not None and gen.flash:
        print(f"{args.cpu}: flash {gen.flash['flash']:,} bytes (int8 weights {gen.micro.int8_weight_bytes:,}), "
              f"arena {gen.micro.arena_bytes:,} bytes of RAM (largest live pair {gen.micro.largest_pair:,})")
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
            what = f"the float network ({graph.source})"
        else:
            net = _network(args)
            graph = _float_graph(args, net)
            what = f"the float network ({net.name})"
        model = export_float_onnx(graph, args.out)
    else:
        q, _ = _quantizer(args, need_data=False)   # a saved quantizer needs no images
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

    def command(name, func, help, data=True, model=True, spec=True):
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(func=func)
        if data:
            c.add_argument("--data", help="CIFAR-10 (archive or folder, 'download', 'sample'), an image folder (one "
                                          "sub-folder per class), a folder with train/ and val/ image folders, a "
                                          ".zip of either, or a .npz (default: $NETQUANT_DATA, else the embedded "
                                          "CIFAR-10 sample)")
        if data and model:   # images are sized to (and labelled for) the network
            c.add_argument("--resize", type=int, metavar="N",
                           help="resize the shorter side of each image to N before the centre crop to the network's "
                                "input (e.g. 256 for 224; default: just cover the input)")
            c.add_argument("--class-names", metavar="FILE",
                           help="text file, one class name per line in the order of the model's outputs; sub-folders "
                                "are labelled by it (default: sorted sub-folder names)")
        if model:
            c.add_argument("--model", help=f"a .onnx file, a netquant .safetensors file or a shipped network "
                                           f"(default: {DEFAULT_MODEL})")
            c.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                           help="the model's input height and width, for a model whose input size is not fixed "
                                "(a symbolic ONNX shape, a global-pool CNN)")
            if spec:
                c.add_argument("--mean", type=float, nargs="+", metavar="M",
                               help="per-channel mean the model subtracts, in its channel order and value range "
                                    "(e.g. 0.485 0.456 0.406)")
                c.add_argument("--std", type=float, nargs="+", metavar="S",
                               help="per-channel standard deviation the model divides by (e.g. 0.229 0.224 0.225)")
                c.add_argument("--channel-order", choices=("RGB", "BGR"), help="the model's channel order (default RGB)")
                c.add_argument("--value-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                               help="the pixel range the model takes before mean/std: 0 1 (default) or 0 255")
        c.add_argument("--seed", type=int, default=0, help="seed of random subsets (default: %(default)s)")
        return c

    c = command("analyze", cmd_analyze, "print the layer table and totals of a network", data=False, spec=False)
    c.add_argument("--json", action="store_true")

    c = command("evaluate", cmd_evaluate, "float top-1 of a network on test images")
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
        c.add_argument(env_flag, dest="target", default="gpu", choices=tuple(TARGETS),
                       help="execution environment: picks the default scheme (default: %(default)s)")
        c.add_argument("--scale", choices=SCALES, help="override the target's scale kind")
        c.add_argument("--granularity", choices=GRANULARITIES, help="weight scale granularity")
        c.add_argument("--range-method", choices=RANGE_METHODS,
                       help="activation range method")
        c.add_argument("--calibration", type=int, help=f"calibration images from the training set (default: "
                                                       f"{DEFAULT_CALIBRATION}, or all of a smaller set)")
        c.add_argument("--float", dest="float", action="append", metavar="LAYER",
                       help="keep LAYER in float (repeatable)")
        c.add_argument("--cle", action="store_true", help="cross-layer equalisation of conv pairs joined by ReLU")
        c.add_argument("--bias-correction", dest="bias_correction", action="store_true",
                       help="shift each layer's bias by its mean output error on the calibration images")
        c.add_argument("--adaround", action="store_true", help="learn each weight's rounding (AdaRound) on the "
                                                               "calibration images")
        c.add_argument("--weight-bits", dest="weight_bits", type=int, choices=range(2, 9), metavar="2..8",
                       help="weight bit width (default 8; 4: -7..7 per channel, stored two per byte: W4A8)")
        if validation:
            c.add_argument("--validation", type=_count,
                           help=f"validation images from the test set: a number or 'all' (default: "
                                f"{DEFAULT_VALIDATION}, or all of a smaller set)")

    def executor_options(c):
        c.add_argument("--workers", type=int, metavar="N",
                       help="local worker processes for the evaluations (default: one per core; 1: none)")
        c.add_argument("--ray", metavar="ADDRESS", help="run the evaluations on the Ray cluster at ADDRESS "
                                                       "(host:port of its head; needs pip install ray)")

    c = command("calibrate", cmd_calibrate, "calibrate a network and print the calibration table")
    quant_options(c)
    c.add_argument("--all-columns", action="store_true", help="print every column")
    c.add_argument("--json", action="store_true")
    c.add_argument("--out", help="save the calibrated quantizer to this file")

    c = command("validate", cmd_validate, "compare float and int8 on validation images")
    quant_options(c, validation=True)
    c.add_argument("--quantizer", help="a saved quantizer file instead of calibrating now")
    c.add_argument("--metric", action="append", help="top1, top5 or module:function (repeatable)")
    c.add_argument("--engine", choices=ENGINES, default="python",
                   help="what runs the int8 side: python, the integer reference executor (default), or c, the "
                        "generated C library built for this CPU (needs a C compiler; bit-exact with it, and much "
                        "faster on large networks and sets)")
    c.add_argument("--json", action="store_true")

    c = command("sensitivity", cmd_sensitivity, "per layer: the metric with only it quantized and with only it "
                                                 "float, and its SQNR against float; most harmful first")
    quant_options(c, validation=True)
    c.add_argument("--quantizer", help="a saved quantizer file instead of calibrating now")
    c.add_argument("--metric", dest="sensitivity_metric", default="top1",
                   help="top1, top5 or module:function, higher is better (default: %(default)s)")
    executor_options(c)
    c.add_argument("--json", action="store_true")

    c = command("quantize", cmd_quantize, "calibrate, quantize, print the details and save the quantizer")
    quant_options(c, validation=True)
    c.add_argument("--max-drop", dest="max_drop", type=float, metavar="POINTS",
                   help="choose W4A8, int8 or float per conv/fc layer for the least memory with --metric at most "
                        "POINTS below float on --validation test images (default 1000); prints the Pareto front")
    c.add_argument("--metric", dest="search_metric", default="top1",
                   help="the metric of --max-drop: top1, top5 or module:function (default: %(default)s)")
    executor_options(c)
    c.add_argument("--quantizer", help="a saved quantizer file instead of calibrating now")
    c.add_argument("--out", help="quantizer file to write (default: quantizer.nq)")
    c.add_argument("--json", action="store_true")

    c = command("codegen", cmd_codegen, "generate C for the int8 network, build it, write the report")
    quant_options(c, env_flag="--environment")
    c.add_argument("--quantizer", help="a saved quantizer file instead of calibrating now")
    c.add_argument("--target", dest="codegen_target", default="c", choices=CODEGEN_TARGETS,
                   help="code generation target (micro: Arm Cortex-M, C99 without heap, see --cpu)")
    c.add_argument("--cpu", default="cortex-m4", choices=MICRO_CPUS,
                   help="--target micro: the Cortex-M core (m4/m7: DSP SMLAD kernels, m55: MVE; default: %(default)s)")
    c.add_argument("--cross", choices=CROSS_TRIPLES,
                   help="cross-build for Arm Cortex-A (aarch64) with that toolchain; --isa neon (dot product, "
                        "default), neon-v8 or scalar")
    c.add_argument("--arch", default="sm_90", help="GPU architecture for --target cuda, or several separated by commas for one library "
                        "that runs on each (sm_80,sm_90) (default: %(default)s)")
    c.add_argument("--tensor-cores", action=argparse.BooleanOptionalAction, default=None,
                   help="--target cuda: convolutions on int8 tensor cores (cp.async, ldmatrix, mma.sync; sm_80 and "
                        "newer) or, with --no-tensor-cores, dp4a (default: tensor cores wherever --arch has them)")
    c.add_argument("--isa", default="native", choices=tuple(ISA_FLAGS) + ARM_ISAS,
                   help="native: this CPU's best kernels (AMX, else AVX-512 VNNI); avx512: VNNI even where AMX "
                        "is present; scalar: the portable path; neon (Armv8.2-A SDOT) and neon-v8 (plain NEON): "
                        "with --cross aarch64-linux-gnu, or on an Arm host")
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

    c = command("demo", cmd_demo, "the main job: analyse, load data, tile, evaluate, calibrate, validate, save",
                spec=False)
    quant_options(c, validation=True)
    c.add_argument("--out", default="netquant-out", help="folder for the files it writes")
    return p


def _count(text: str):
    try:
        return image_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _deliberate(e: BaseException) -> bool:
    """True for an error the user can fix: a NetquantError (bad input, a bad file, a missing
    tool: netquant raised it on purpose, with a message written for the user), or an OSError
    from the system (a file or folder missing, unreadable or full; its message names the path).
    Anything else, a ValueError raised inside numpy or torch say, is a bug in netquant."""
    return isinstance(e, (NetquantError, OSError))


def main(argv=None) -> int:
    """Run one command. Exit status: 0 done; 2 a user-fixable error, printed as one line; 1 a bug
    in netquant (the traceback is printed, and says so); 130 interrupted (Ctrl-C), one line; a
    quantizer, calibration, ONNX, weights or tile file being saved is left as it was (atomic writes)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_args(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\nnetquant {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _deliberate(e):
            import traceback

            traceback.print_exc()
            print(f"netquant {args.command}: internal error ({type(e).__name__}); this is a bug in netquant, "
                  f"please report it with the traceback above", file=sys.stderr)
            return 1
        print(f"netquant {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)   # one line
        return 2


if __name__ == "__main__":
    sys.exit(main())
