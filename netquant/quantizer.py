"""The user-facing quantizer: the Python counterpart of MATLAB's ``dlquantizer``.

    q = Quantizer(net, target="gpu")
    table = q.calibrate(calibration_images)      # a pandas DataFrame, one row per tensor
    q.set_quantize("S1U1_conv1", False)          # keep a layer in float
    result = q.validate(validation_images, metrics=["top1", "top5"])
    qnet = q.quantize()                          # the integer network and its executor
    q.save("resnet20.nq"); q2 = Quantizer.load("resnet20.nq")

A model trained on other input than netquant's (RGB in [0, 1]) declares it once, instead of being
wrapped in a normalisation module:

    q = Quantizer(net, input_spec=InputSpec((3, 224, 224), value_range=(0, 255),
                                            mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)))

Everything here is a thin layer over the core: capture (ir), calibrate (calib), lower (quant),
run_int8 (ref) and the metrics.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .calib.calibrate import check_images, graph_fingerprint
from .calib.stats import HALF_BINS, RangeTable
from .errors import ArgumentError, InputError, MetricError, QuantizerFileError, StateError
from .ir.capture import CaptureError, capture
from .ir.float_exec import run_float
from .ir.graph import WEIGHTED_OPS, Graph
from .ir.input_spec import InputSpec, apply_input_spec
from .metrics import agreement, mcnemar, paired_bootstrap, resolve_metric, sqnr_db
from .progress import Progress, report
from .quant import io as qio
from .quant import numerics as nx
from .quant.config import ENGINES, QuantConfig, target_config
from .quant.int4 import is_int4, packed_size, weight_bits
from .quant.lower import float_reasons, lower
from .quant.qgraph import QGraph
from .ref.executor import run_int8

log = logging.getLogger(__name__)
FLOAT_BYTES, INT8_BYTES, INT32_BYTES = 4, 1, 4


def _as_images(images, what: str):
    """(float32 images in [0, 1] NCHW, labels or None, provenance) from an ImageSet, a
    (images, labels) pair or an array."""
    from .data.cifar10 import ImageSet

    if isinstance(images, ImageSet):
        return images.images, images.labels, images.source
    labels, source = None, "images given as an array"
    if isinstance(images, tuple) and len(images) == 2:
        images, labels = images
        labels, source = _labels(labels, what), "images given as arrays"
    images = _image_array(images, what)
    return images, labels, f"{len(images)} {source}"


def _image_array(images, what: str) -> np.ndarray:
    """``images`` (an array or a tensor, detached) as a numpy array; float images must be in
    [0, 1]: a float array whose largest value is above 2 holds 0..255 pixels (a CIFAR image has a
    maximum near 255), which would saturate every layer, so it is refused with the fix."""
    if images is None:
        raise InputError(f"{what}: expected images (an ImageSet, an (N, C, H, W) array or a tensor), got None")
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()   # requires_grad or not: the values are what count
    try:
        images = np.asarray(images)
    except (ValueError, TypeError) as e:
        raise InputError(f"{what}: not an array of images ({e})") from e
    if images.dtype == object or images.dtype.kind not in "uif" or images.dtype.kind in "ui" and \
            images.dtype != np.uint8:
        raise InputError(f"{what}: expected uint8 images (0..255) or float images in [0, 1], got dtype "
                         f"{images.dtype} (convert {images.dtype} pixels with .astype(np.uint8) or / 255)")
    if images.dtype.kind == "f" and images.size and np.isfinite(images).all() and float(images.max()) > 2.0:
        raise InputError(f"{what}: float images with values up to {float(images.max()):g}: netquant takes float "
                         f"images in [0, 1] (divide by 255) or uint8 pixels; a model that expects 0..255 "
                         f"declares it with input_spec=InputSpec(..., value_range=(0, 255))")
    return images


def _labels(labels, what: str) -> np.ndarray:
    """Labels as int64 class numbers >= 0 (integers, or floats that are whole numbers)."""
    if labels is None:
        raise InputError(f"{what}: labels are None; pass (images, labels) with one class number per image")
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or y.dtype.kind not in "uif" or y.dtype.kind == "f" and not (
            np.isfinite(y).all() and (y == np.round(y)).all()):
        raise InputError(f"{what}: expected labels as a 1-D array of class numbers, got {y.dtype} {y.shape}")
    if y.size and y.min() < 0:
        raise InputError(f"{what}: label {y.min():g} is negative; labels are class numbers 0, 1, ...")
    return y.astype(np.int64)


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ArgumentError(f"batch_size: expected a positive number of images, got {batch_size!r}")
    return int(batch_size)


@dataclass(frozen=True)
class QuantizedNetwork:
    """An integer network and how to run it."""

    qgraph: QGraph
    config: QuantConfig

    def run(self, images, batch_size: int = 500, progress: Optional[Progress] = None) -> np.ndarray:
        """Scores (N, classes) for float images in [0, 1] (or uint8), computed in integers."""
        batch_size = _check_batch_size(batch_size)
        x = check_images(_as_images(images, "images")[0], self.qgraph.node(self.qgraph.input).shape)
        outs = []
        for start in range(0, len(x), batch_size):
            outs.append(run_int8(self.qgraph, torch.from_numpy(x[start:start + batch_size]), keep=())[self.qgraph.output].numpy())
            report(progress, min(start + batch_size, len(x)), len(x), "int8 inference")
        return np.concatenate(outs)

    def __call__(self, images) -> np.ndarray:
        return self.run(images)

    def __repr__(self) -> str:
        n = sum(q.quantized and q.op in WEIGHTED_OPS for q in self.qgraph.nodes)
        return f"QuantizedNetwork({n} int8 conv/fc layers, {len(self.qgraph.nodes)} steps)"


@dataclass(frozen=True)
class ValidationResult:
    """What :meth:`Quantizer.validate` measured (MATLAB's validation results, and more)."""

    num_samples: int
    metrics: dict          # metric name -> DataFrame (NetworkImplementation, MetricOutput, LearnableParameterMemory(bytes))
    agreement: float       # percent of images where float and int8 predict the same class
    top1_difference: tuple  # (int8 - float, low, high) percentage points, 95% paired bootstrap
    mcnemar_p: float
    layer_errors: object   # DataFrame: per quantized layer SQNR (dB) against the float activation
    source: str
    engine: str = "python"  # what ran the int8 side: "python" (reference executor) or "c" (compiled library)

    def __str__(self) -> str:
        on = "" if self.engine == "python" else "; int8 on the compiled C library"
        parts = [f"Validation on {self.num_samples} images ({self.source}){on}"]
        for name, table in self.metrics.items():
            parts.append(f"-- {name}\n{table.to_string(index=False)}")
        d, lo, hi = self.top1_difference
        parts.append(f"float/int8 top-1 agreement: {self.agreement:.2f}%; top-1 difference int8 - float: "
                     f"{d:+.2f} points (95% CI {lo:+.2f} .. {hi:+.2f}); McNemar p = {self.mcnemar_p:.3g}")
        return "\n".join(parts)


class Quantizer:
    """Calibrate, quantize and validate a CNN; see the module docstring."""

    def __init__(self, model: Optional[torch.nn.Module] = None, target: str = "gpu",
                 config: Optional[QuantConfig] = None, example: Optional[torch.Tensor] = None,
                 graph: Optional[Graph] = None, name: Optional[str] = None,
                 input_spec: Optional[InputSpec] = None):
        """``input_spec``: what the model takes (channel order, pixel range, mean and std), put
        into the graph after its input (:func:`~netquant.ir.input_spec.apply_input_spec`); None:
        the model takes netquant's images (RGB in [0, 1]) as they are, or normalises them itself.
        ``example``, when given, is an input batch as the model itself takes it."""
        if (model is None) == (graph is None):
            raise ArgumentError("Quantizer needs a model (or, when loading, a graph), not both")
        if isinstance(input_spec, dict):
            input_spec = InputSpec.from_json(input_spec)
        if input_spec is not None and not isinstance(input_spec, InputSpec):
            raise ArgumentError(f"input_spec: expected an InputSpec (netquant.ir.input_spec), got "
                                f"{type(input_spec).__name__}")
        self.target = target
        self.config = config if config is not None else target_config(target)
        # bytes of the original model's learnables (its own parameters, before batch-norm
        # folding); None for a quantizer built from a graph (then the graph's parameters count)
        self.float_learnable_bytes: Optional[int] = None
        if graph is None:
            if not isinstance(model, torch.nn.Module):
                raise ArgumentError(f"Quantizer: expected a torch.nn.Module, got {type(model).__name__}")
            if model.training:   # quantizing a network means its inference behaviour (batch norm statistics)
                log.warning("%s is in train mode: it is captured in eval mode (batch norm uses its running "
                            "statistics, dropout is off) and left in train mode", type(model).__name__)
            if example is None and input_spec is not None:
                # netquant-style random images, converted to what the model takes
                example = input_spec.apply(torch.rand(2, *input_spec.shape, generator=torch.Generator().manual_seed(0)))
            if example is None:
                _check_default_example(model)
            was_training = model.training
            try:
                graph = capture(model.eval(), example)
            finally:
                model.train(was_training)   # the user's module keeps its mode
            self.float_learnable_bytes = FLOAT_BYTES * sum(p.numel() for p in model.parameters())
            name = name or getattr(getattr(model, "spec", None), "name", type(model).__name__)
        self.graph = apply_input_spec(graph, input_spec)
        self.input_spec = input_spec
        self.name = name or graph.source
        self.ranges: Optional[RangeTable] = None
        self.user_float: frozenset = frozenset()
        self.provenance: dict = {}
        self._qnet: Optional[QuantizedNetwork] = None
        self._c_engine: Optional[tuple] = None   # (key, qnet, compiled network, temporary folder), see compiled()

    # --- calibrate ------------------------------------------------------------------------
    def calibrate(self, images, batch_size: int = 100, progress: Optional[Progress] = None):
        """Run the float network over ``images`` (an ImageSet or an (N, 3, H, W) array, uint8
        or float in [0, 1]) and return the calibration table (see :meth:`calibration_table`)."""
        batch_size = _check_batch_size(batch_size)
        x, _, source = _as_images(images, "calibration images")
        if len(x) == 0:
            raise InputError("calibration images: no images (an empty set)")
        from .accuracy import applied, calibrate_graph

        # CLE, AdaRound and bias correction (config flags) are applied while calibrating
        self.graph, self.ranges = calibrate_graph(self.graph, x, self.config, self.user_float, batch_size, progress,
                                                  source)
        self.provenance["accuracy"] = applied(self.config)
        self.provenance["calibration"] = {"source": source, "images": int(len(x)),
                                          "md5": _md5(np.ascontiguousarray(x))}
        self._qnet = None
        # the statistics are kept whatever happens next: an error in lowering or in the table
        # leaves them in self.ranges (to save, inspect or re-decide with another config)
        try:
            return self.calibration_table()
        except Exception as e:
            e.add_note(f"the calibration statistics of {len(x)} images were kept (Quantizer.ranges)")
            raise

    def _require_ranges(self) -> RangeTable:
        if self.ranges is None:
            raise StateError("calibrate first: the quantizer has no calibration statistics")
        return self.ranges

    def calibration_table(self):
        """One row per weight, bias and activation tensor: MATLAB's columns (Optimized Layer
        Name, Network Layer Name, Learnables / Activations, MinValue, MaxValue) and more: the
        integer type and scale chosen, the % of values that saturate and that underflow to zero,
        the bits the values use, whether the layer is quantized and why not."""
        import pandas as pd

        ranges = self._require_ranges()
        qg = self.quantize().qgraph
        qnodes = {n.name: n for n in qg.nodes}
        reasons = float_reasons(self.graph, self.user_float)
        rows = []
        for s in ranges:
            node = self.graph.node(s.node)
            qn = qnodes.get(s.node)
            quantized = bool(qn is not None and qn.quantized)
            scale, dtype, limit = _row_scale(s, qn, qnodes, node.op)
            sat, under = _saturation(s, scale, limit) if quantized else (math.nan, math.nan)
            bits = (math.ceil(math.log2(s.absmax / scale + 1)) + (dtype == "int8" or s.kind == "Weights")) if quantized and s.absmax > 0 else 0
            name = s.node if s.kind == "Activations" else f"{s.node}_{s.kind}"
            rows.append({"Optimized Layer Name": name, "Network Layer Name": s.layer,
                         "Learnables / Activations": s.kind, "MinValue": s.min, "MaxValue": s.max,
                         "Type": dtype if quantized else "float32", "Scale": scale if quantized else math.nan,
                         "Saturation %": sat, "Underflow %": under, "BitsUsed": bits,
                         "Quantize": quantized,
                         "Reason": "" if quantized else ((qn.reason if qn is not None else None)
                                                         or reasons.get(s.node, "network input"))})
        return pd.DataFrame(rows)

    # --- choose layers --------------------------------------------------------------------
    def set_quantize(self, layer: str, quantize: bool) -> None:
        """Quantize ``layer`` (a Network or Optimized Layer Name) or keep it in float."""
        node = self.graph.find_layer(layer)  # KeyError naming the layers if unknown
        if node.op == "input":
            raise ArgumentError(f"{layer} is the network input; it is never quantized")
        names = {node.name, *node.layers}
        self.user_float = (self.user_float - names) if quantize else (self.user_float | {node.name})
        self._qnet = None

    def set_config(self, config: QuantConfig) -> None:
        self.config = config
        self._qnet = None

    # --- quantize -------------------------------------------------------------------------
    def quantize(self) -> QuantizedNetwork:
        """The integer network for the current calibration, config and layer choices."""
        if self._qnet is None:
            from .accuracy import check_applied

            check_applied(self.config, self.provenance)
            self._qnet = QuantizedNetwork(lower(self.graph, self._require_ranges(), self.config, self.user_float),
                                          self.config)
        return self._qnet

    def quantization_details(self):
        """Per layer: quantized or not (and why), the integer types, and learnable memory in bytes
        in float and as quantized; the last row holds the totals."""
        import pandas as pd

        qg = self.quantize().qgraph
        reasons = float_reasons(self.graph, self.user_float)
        rows = []
        for n in self.graph.nodes:
            if n.op == "input":
                continue
            q = qg.node(n.name)
            float_bytes = sum(p.size for k, p in n.params.items() if k in ("weight", "bias", "scale", "shift")) * FLOAT_BYTES
            if q.quantized and n.op in WEIGHTED_OPS:
                if is_int4(q):   # two weights per byte (quant/int4.py)
                    wbytes, wtype = packed_size(q.params["weight"].size), f"int{weight_bits(q)} (two per byte)"
                else:
                    wbytes, wtype = q.params["weight"].size * INT8_BYTES, "int8"
                qbytes = wbytes + q.params["bias"].size * INT32_BYTES
                types = f"weights {wtype}, bias int32, output {q.dtype}"
            else:
                qbytes = float_bytes
                types = f"output {q.dtype}" if q.quantized else "float32"
            rows.append({"Layer": n.name, "Network Layers": "+".join(n.layers), "Op": n.op,
                         "Quantized": q.quantized, "Types": types,
                         "Reason": "" if q.quantized else (q.reason or reasons.get(n.name, "")),
                         "FloatBytes": float_bytes, "QuantizedBytes": qbytes})
        table = pd.DataFrame(rows)
        total = {"Layer": "total", "Network Layers": "", "Op": "", "Quantized": bool(table.Quantized.all()),
                 "Types": "", "Reason": "", "FloatBytes": int(table.FloatBytes.sum()),
                 "QuantizedBytes": int(table.QuantizedBytes.sum())}
        return pd.concat([table, pd.DataFrame([total])], ignore_index=True)

    def learnable_memory(self) -> tuple[int, int]:
        """(float bytes of the original network's learnables, bytes after quantization)."""
        details = self.quantization_details()
        quant = int(details.QuantizedBytes.iloc[-1])
        original = self.float_learnable_bytes or int(details.FloatBytes.iloc[-1])
        return original, quant

    # --- validate -------------------------------------------------------------------------
    def _labelled_images(self, images, what: str):
        """(float images checked against the network input, labels, provenance) for ``what``
        ("validation", "sensitivity"): labels are required and must match the images."""
        x, labels, source = _as_images(images, f"{what} images")
        if labels is None:
            raise InputError(f"{what} needs labels: pass an ImageSet or (images, labels)")
        x = check_images(x, self.graph.input.shape, f"{what} images ({source})")
        if len(labels) != len(x):
            raise InputError(f"{what}: {len(x)} images but {len(labels)} labels")
        return x, labels, source

    def validate(self, images, metrics: Sequence = ("top1", "top5"), batch_size: int = 500,
                 progress: Optional[Progress] = None, error_images: int = 100, engine: str = "python",
                 c_folder=None):
        """Run float and int8 on labelled ``images`` and compare them on each metric.

        ``engine`` runs the int8 side: "python", the integer reference executor, or "c", the C
        library generated and built for this CPU (:meth:`compiled`; ``c_folder`` keeps its sources
        and build there, default a private temporary folder). The C library computes the same
        integers, bit for bit (tests/test_engine_c.py), many times faster on a large network (the
        reference executor takes seconds per ResNet-50 image): its integer class scores go through
        the same float tail (dequantize, softmax) as the reference executor's, so the scores, and
        every table, are identical. The float side is the float executor either way, and the
        per-layer errors (on the first ``error_images`` images) always come from the reference
        executor, the only one that keeps every intermediate tensor."""
        import pandas as pd

        if engine not in ENGINES:
            raise ArgumentError(f"validate: engine must be 'python' (the reference executor) or 'c' (the compiled C "
                                f"library), got {engine!r}")
        x, labels, source = self._labelled_images(images, "validation")
        batch_size = _check_batch_size(batch_size)
        out_shape = tuple(self.graph.node(self.graph.output).shape)
        if len(out_shape) != 1:
            raise InputError(f"validate compares class scores (N, classes), but {self.name}'s output "
                             f"{self.graph.output} is (N, {', '.join(map(str, out_shape))}) per image; quantize "
                             f"and run it with quantize().run, or end the network in class scores")
        if labels.size and labels.max() >= out_shape[0]:
            raise InputError(f"validation labels ({source}): label {labels.max()} but the network has {out_shape[0]} "
                             f"outputs (classes 0..{out_shape[0] - 1})")
        fns = _named_metrics(metrics)
        _probe_metrics(fns, run_float(self.graph, torch.from_numpy(x[:4]), keep=())[self.graph.output].numpy(),
                       labels[:4])
        qnet = self.quantize()
        if engine == "c":
            cnet = self.compiled(c_folder)

            def int8_scores(xb):
                return _compiled_scores(cnet, qnet.qgraph, xb.numpy())
        else:
            def int8_scores(xb):
                return run_int8(qnet.qgraph, xb, keep=())[qnet.qgraph.output].numpy()
        f_scores, q_scores = [], []
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[start:start + batch_size])
            f_scores.append(run_float(self.graph, xb, keep=())[self.graph.output].numpy())
            q_scores.append(int8_scores(xb))
            report(progress, min(start + batch_size, len(x)), len(x), f"validating float and int8 ({engine})")
        fs, qs = np.concatenate(f_scores), np.concatenate(q_scores)
        fmem, qmem = self.learnable_memory()
        tables = {}
        for name, fn in fns.items():
            tables[name] = pd.DataFrame({
                "NetworkImplementation": ["Floating-Point", "Quantized"],
                "MetricOutput": [_call_metric(name, fn, fs, labels), _call_metric(name, fn, qs, labels)],
                "LearnableParameterMemory(bytes)": [fmem, qmem]})
        fc, qc = fs.argmax(1) == labels, qs.argmax(1) == labels
        errors = self.layer_errors(x[:error_images])
        return ValidationResult(len(x), tables, agreement(fs, qs), paired_bootstrap(fc, qc), mcnemar(fc, qc),
                                errors, source, engine)

    def compiled(self, folder=None):
        """The int8 network as a C library built for this CPU (:func:`netquant.codegen.generate`
        and :func:`~netquant.codegen.load`): a :class:`~netquant.codegen.CompiledNetwork`, kept
        with the quantizer until its network changes (calibration, config, layer choices).
        ``folder``: where the sources and the build go (an unchanged network there is not
        rebuilt: the build is cached by the hash of its sources); None: a private temporary
        folder, removed with the quantizer. Raises :class:`~netquant.codegen.BuildError` naming
        what to install when there is no C compiler."""
        from .codegen import generate, load
        from .codegen.build import find_compiler

        qnet = self.quantize()
        key = (id(qnet), None if folder is None else str(folder))
        cached = self._c_engine
        if cached is not None and cached[0] == key and cached[1] is qnet:
            return cached[2]
        find_compiler()  # no compiler: say so before generating anything
        tmp = None
        if folder is None:
            import tempfile

            tmp = tempfile.TemporaryDirectory(prefix="netquant-c-")  # removed when the cache entry goes
            folder = tmp.name
        prov = f"network {self.name}; calibration: {self.provenance.get('calibration', {}).get('source', 'n/a')}"
        gen = generate(qnet, folder, name="net", provenance=prov)
        net = load(gen)
        log.info("int8 engine: the C library %s (%s kernels)", gen.build.get("library"), net.kernels)
        self._c_engine = (key, qnet, net, tmp)
        return net

    def layer_errors(self, images):
        """Per integer layer: SQNR (dB) of its dequantized output against the float network's
        activation on the same images, and the largest error in LSB."""
        import pandas as pd

        x = torch.from_numpy(check_images(images, self.graph.input.shape))
        qg = self.quantize().qgraph
        fvals = run_float(self.graph, x)
        qvals = run_int8(qg, x)
        rows = []
        for n in qg.nodes:
            if n.quantized and n.name in fvals:
                ref = fvals[n.name].numpy()
                deq = qvals[n.name].numpy().astype(np.float64) * n.scale
                rows.append({"Layer": n.name, "Op": n.op, "SQNR_dB": sqnr_db(ref, deq),
                             "MaxErrorLSB": float(np.abs(ref - deq).max() / n.scale)})
        return pd.DataFrame(rows)

    # --- sensitivity ----------------------------------------------------------------------
    def sensitivity(self, images, metric="top1", batch_size: int = 100, progress: Optional[Progress] = None,
                    workers: Optional[int] = None, ray_address: Optional[str] = None, executor=None):
        """Per layer that requantizes: ``metric`` (higher is better) with only that layer
        quantized and with only that layer kept float, and its SQNR against float; a pandas
        DataFrame, most harmful layer first (:mod:`netquant.accuracy.sensitivity`). The batches
        run in ``workers`` local processes (None: one per core; 1: this process), or on the Ray
        cluster at ``ray_address``, or on ``executor`` (:mod:`netquant.executor`)."""
        from .accuracy.sensitivity import sensitivity

        x, labels, source = self._labelled_images(images, "sensitivity")
        self.quantize()   # the checks of the current config and calibration
        return sensitivity(self.graph, self._require_ranges(), self.config, x, labels, resolve_metric(metric),
                           self.user_float, batch_size, progress, executor, workers, ray_address)

    # --- accuracy-budget mixed precision ------------------------------------------------
    def auto_precision(self, images, max_drop: float = 0.1, metric="top1", objective: str = "memory",
                       batch_size: int = 100, max_evaluations: int = 64, progress: Optional[Progress] = None,
                       workers: Optional[int] = None, ray_address: Optional[str] = None, executor=None):
        """Per conv/linear layer W4A8, int8 or float, for the least learnable memory with
        ``metric`` on the labelled ``images`` at most ``max_drop`` below the float network's
        (:mod:`netquant.accuracy.search`: probes, a prefix search and greedy refinement, every
        configuration measured). Returns ``(quantizer, front, explored)``: a new calibrated
        Quantizer with the chosen configuration (this one is unchanged), the Pareto front
        (memory vs metric) of the configurations measured and all of them (pandas DataFrames).
        Evaluations run in ``workers`` local processes (None: one per core), on the Ray cluster
        at ``ray_address`` or on ``executor``."""
        from .accuracy.search import AutoPrecision, auto_precision, derive, memory_bytes, tables

        x, labels, _ = self._labelled_images(images, "auto precision")
        base = self.quantize()
        cfg, uf, rows, chosen, m_float, m_int = auto_precision(
            self.graph, self._require_ranges(), self.config, x, labels, resolve_metric(metric), max_drop,
            self.user_float, objective, _check_batch_size(batch_size), max_evaluations, progress, executor, workers,
            ray_address)
        fmem = self.learnable_memory()[0]
        front, explored = tables(rows, chosen, m_float, m_int, memory_bytes(self.graph, base.qgraph, self.config),
                                 fmem)
        q = derive(self, cfg, uf)
        q.provenance["auto_precision"] = {"max_drop": max_drop, "images": int(len(x)), "metric": rows[chosen]["Metric"],
                                          "float_metric": m_float, "memory_bytes": int(rows[chosen]["MemoryBytes"])}
        return AutoPrecision(q, front, explored)

    # --- save / load ----------------------------------------------------------------------
    def save(self, path) -> None:
        """Write one portable file (zip of JSON and safetensors; no pickle)."""
        qio.save_quantizer(qio.SavedQuantizer(self.graph, self.target, self.config, self.name, self.input_spec,
                                              self.ranges, self.user_float, self.provenance,
                                              self.float_learnable_bytes, qio.int4_weights(self)), path)

    @classmethod
    def load(cls, path) -> "Quantizer":
        """The quantizer saved at ``path`` (:func:`netquant.quant.io.load_quantizer` checks the file)."""
        saved = qio.load_quantizer(path)
        q = cls(graph=saved.graph, target=saved.target, config=saved.config, name=saved.name)
        # the stored graph already holds the spec's nodes: record the spec, do not apply it again
        q.input_spec = saved.input_spec
        q.ranges = saved.ranges
        q.user_float = saved.user_float
        q.provenance = saved.provenance
        q.float_learnable_bytes = saved.float_learnable_bytes
        if saved.int4 is not None:
            qio.check_int4(path, q, saved.int4)   # the stored 4-bit weights are those lowering gives
        return q

    def save_calibration(self, path) -> None:
        """Write the calibration statistics alone (to re-decide ranges elsewhere)."""
        qio.save_ranges(self._require_ranges(), path)

    def load_calibration(self, path) -> None:
        """Read statistics written by :meth:`save_calibration`; they must come from this network."""
        ranges = qio.load_ranges(path)
        mine = graph_fingerprint(self.graph)
        if ranges.fingerprint != mine:
            raise QuantizerFileError(f"{path}: calibration statistics of another network (fingerprint "
                                     f"{ranges.fingerprint}, this network is {mine})")
        self.ranges = ranges
        self._qnet = None

    def __repr__(self) -> str:
        state = repr(self.ranges) if self.ranges is not None else "not calibrated"
        spec = f", input: {self.input_spec!r}" if self.input_spec is not None else ""
        return (f"Quantizer({self.name}, target={self.target}{spec}, {state}, "
                f"float layers: {sorted(self.user_float) or 'none'})")


def _float_tail(q: QGraph) -> Optional[QGraph]:
    """The part of ``q`` after its integer output (``q.int_output()``: the class scores before
    dequantize and softmax) as a QGraph whose input is that integer tensor; None where the tail
    also reads other tensors (a float branch from earlier in the network)."""
    start = q.int_output()
    nodes = {n.name: n for n in q.nodes}
    need, stack = set(), [q.output]
    while stack:
        name = stack.pop()
        if name == start or name in need:
            continue
        if nodes[name].op == "input":
            return None
        need.add(name)
        stack.extend(nodes[name].inputs)
    head = nodes[start].with_(op="input", inputs=())
    return QGraph((head, *(n for n in q.nodes if n.name in need)), q.output, start)


def _compiled_scores(cnet, q: QGraph, x: np.ndarray) -> np.ndarray:
    """Scores (N, classes) of the compiled library ``cnet`` for float images ``x``, made as the
    reference executor makes them: the library's integer output (``predict_int``, bit-exact with
    the reference executor) through the graph's float tail run by the reference executor, so the
    scores equal ``run_int8``'s bit for bit. Where the tail reads more than the integer output,
    the library's own float scores (they differ by float rounding only: its softmax uses expf,
    the reference torch.exp; below 1e-6)."""
    tail = _float_tail(q)
    ints = None if tail is None else cnet.predict_int(x)       # (N, elements) int32, NCHW order
    if ints is None or ints.shape[1] != math.prod(tail.node(tail.input).shape):
        return cnet.predict(x)
    ints = ints.reshape(len(x), *tail.node(tail.input).shape)
    return run_int8(tail, torch.from_numpy(ints), keep=())[tail.output].numpy()


def _check_default_example(model: torch.nn.Module) -> None:
    """Without ``example`` a network is captured on 3x32x32 images; one whose first convolution
    takes another number of channels gets told to pass ``example=`` (instead of torch's errors)."""
    first = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    if first is not None and first.in_channels != 3:
        raise CaptureError(f"{type(model).__name__}: its first convolution takes {first.in_channels} channel(s), "
                           f"and without example= netquant captures it on (N, 3, 32, 32) images; pass "
                           f"example=torch.rand(1, {first.in_channels}, H, W) with the input size it takes, "
                           f"or input_spec=InputSpec(({first.in_channels}, H, W))")


def _named_metrics(metrics) -> dict:
    """Metric name (the function's ``__name__``) -> callable; the same function given twice
    counts once, and a repeated name of another function gets a suffix (two lambdas: "<lambda>"
    and "<lambda> (2)"), so no metric's table overwrites another's."""
    if isinstance(metrics, (str, bytes)) or callable(metrics):
        metrics = [metrics]
    out = {}
    for m in metrics:
        fn = resolve_metric(m)
        if any(fn is f for f in out.values()):
            continue   # the same function named twice ("top1" and "netquant.metrics:top1"): one table
        base = getattr(fn, "__name__", None) or (m if isinstance(m, str) else "metric")
        name, k = base, 2
        while name in out:
            name, k = f"{base} ({k})", k + 1
        out[name] = fn
    return out


def _call_metric(name: str, fn, scores: np.ndarray, labels: np.ndarray) -> float:
    """fn(scores, labels) as a float; a metric that raises or returns no number is a MetricError
    naming it."""
    try:
        v = fn(scores, labels)
        return float(v)
    except Exception as e:   # the user's code: any failure is reported as the metric's
        raise MetricError(f"metric {name}: failed on scores {scores.shape} and labels {labels.shape} "
                          f"({type(e).__name__}: {e}); a metric is fn(scores (N, classes), labels (N,)) -> float") \
            from e


def _probe_metrics(fns: dict, scores: np.ndarray, labels: np.ndarray) -> None:
    """Call every metric on the first images' float scores, so a metric that fails does so
    before the inference over the whole set, not after it."""
    for name, fn in fns.items():
        _call_metric(name, fn, scores, labels)


def _md5(a: np.ndarray) -> str:
    import hashlib

    return hashlib.md5(a.tobytes()).hexdigest()


def _row_scale(s, qn, qnodes, op):
    """(scale, dtype, clipping threshold) of the tensor a table row describes."""
    if qn is None:
        return math.nan, "float32", math.nan
    if s.kind == "Weights" and "weight_scale" in qn.params:
        ws, bits = qn.params["weight_scale"], weight_bits(qn)
        return float(ws.max()), f"int{bits}", float((ws * (2 ** (bits - 1) - 1)).max())
    if s.kind == "Bias" and "weight_scale" in qn.params:
        src = qnodes[qn.inputs[0]]
        bs = src.scale * qn.params["weight_scale"]
        return float(bs.max()), "int32", float(bs.max() * nx.INT32[1])
    if qn.quantized:
        return qn.scale, qn.dtype, qn.scale * nx.dtype_range(qn.dtype)[1]
    if (f"{s.node}_quantize") in qnodes:  # a float tensor quantized on its way into an int layer
        q = qnodes[f"{s.node}_quantize"]
        return q.scale, q.dtype, q.scale * nx.dtype_range(q.dtype)[1]
    return math.nan, "float32", math.nan


def _saturation(s, scale: float, limit: float) -> tuple[float, float]:
    """(% of values beyond the representable range, % of non-zero values that round to 0),
    estimated from the linear histogram (bin centres)."""
    if not (scale > 0) or s.count == 0:
        return math.nan, math.nan
    width = s.limit / HALF_BINS
    centres = (np.arange(-HALF_BINS, HALF_BINS) + 0.5) * width
    mag = np.abs(centres)
    sat = s.hist[mag > limit + 0.5 * scale].sum()
    under = s.hist[(mag < 0.5 * scale)].sum() - s.zeros
    return 100.0 * sat / s.count, 100.0 * max(under, 0) / s.count
