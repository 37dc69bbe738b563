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

from .calib.calibrate import calibrate as _calibrate
from .calib.calibrate import check_images, graph_fingerprint
from .calib.stats import HALF_BINS, RangeTable
from .ir.capture import capture
from .ir.float_exec import run_float
from .ir.graph import WEIGHTED_OPS, Graph
from .ir.input_spec import InputSpec, apply_input_spec
from .metrics import agreement, mcnemar, paired_bootstrap, resolve_metric, sqnr_db
from .progress import Progress, report
from .quant.config import QuantConfig, target_config
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
    if isinstance(images, tuple) and len(images) == 2:
        return images[0], np.asarray(images[1]), f"{len(images[0])} images given as arrays"
    if isinstance(images, torch.Tensor):
        images = images.numpy()
    return images, None, f"{len(images)} images given as an array"


@dataclass(frozen=True)
class QuantizedNetwork:
    """An integer network and how to run it."""

    qgraph: QGraph
    config: QuantConfig

    def run(self, images, batch_size: int = 500, progress: Optional[Progress] = None) -> np.ndarray:
        """Scores (N, classes) for float images in [0, 1] (or uint8), computed in integers."""
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

    def __str__(self) -> str:
        parts = [f"Validation on {self.num_samples} images ({self.source})"]
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
            raise ValueError("Quantizer needs a model (or, when loading, a graph), not both")
        if isinstance(input_spec, dict):
            input_spec = InputSpec.from_json(input_spec)
        if input_spec is not None and not isinstance(input_spec, InputSpec):
            raise ValueError(f"input_spec: expected an InputSpec (netquant.ir.input_spec), got "
                             f"{type(input_spec).__name__}")
        self.target = target
        self.config = config if config is not None else target_config(target)
        if graph is None:
            model = model.eval()
            if example is None and input_spec is not None:
                # netquant-style random images, converted to what the model takes
                example = input_spec.apply(torch.rand(2, *input_spec.shape, generator=torch.Generator().manual_seed(0)))
            graph = capture(model, example)
            self.float_learnable_bytes = FLOAT_BYTES * sum(p.numel() for p in model.parameters())
            name = name or getattr(getattr(model, "spec", None), "name", type(model).__name__)
        self.graph = apply_input_spec(graph, input_spec)
        self.input_spec = input_spec
        self.name = name or graph.source
        self.ranges: Optional[RangeTable] = None
        self.user_float: frozenset = frozenset()
        self.provenance: dict = {}
        self._qnet: Optional[QuantizedNetwork] = None

    # --- calibrate ------------------------------------------------------------------------
    def calibrate(self, images, batch_size: int = 100, progress: Optional[Progress] = None):
        """Run the float network over ``images`` (an ImageSet or an (N, 3, H, W) array, uint8
        or float in [0, 1]) and return the calibration table (see :meth:`calibration_table`)."""
        x, _, source = _as_images(images, "calibration images")
        if len(x) == 0:
            raise ValueError("calibration images: no images (an empty set)")
        self.ranges = _calibrate(self.graph, x, batch_size, progress, source)
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
            raise ValueError("calibrate first: the quantizer has no calibration statistics")
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
            bits = (math.ceil(math.log2(s.absmax / scale + 1)) + (dtype == "int8")) if quantized and s.absmax > 0 else 0
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
            raise ValueError(f"{layer} is the network input; it is never quantized")
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
                qbytes = q.params["weight"].size * INT8_BYTES + q.params["bias"].size * INT32_BYTES
                types = f"weights int8, bias int32, output {q.dtype}"
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
        original = getattr(self, "float_learnable_bytes", None) or int(details.FloatBytes.iloc[-1])
        return original, quant

    # --- validate -------------------------------------------------------------------------
    def validate(self, images, metrics: Sequence = ("top1", "top5"), batch_size: int = 500,
                 progress: Optional[Progress] = None, error_images: int = 100):
        """Run float and int8 on labelled ``images`` and compare them on each metric."""
        import pandas as pd

        x, labels, source = _as_images(images, "validation images")
        if labels is None:
            raise ValueError("validation needs labels: pass an ImageSet or (images, labels)")
        x = check_images(x, self.graph.input.shape, f"validation images ({source})")
        if len(labels) != len(x):
            raise ValueError(f"validation: {len(x)} images but {len(labels)} labels")
        fns = [resolve_metric(m) for m in metrics]
        qnet = self.quantize()
        f_scores, q_scores = [], []
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[start:start + batch_size])
            f_scores.append(run_float(self.graph, xb, keep=())[self.graph.output].numpy())
            q_scores.append(run_int8(qnet.qgraph, xb, keep=())[qnet.qgraph.output].numpy())
            report(progress, min(start + batch_size, len(x)), len(x), "validating float and int8")
        fs, qs = np.concatenate(f_scores), np.concatenate(q_scores)
        fmem, qmem = self.learnable_memory()
        tables = {}
        for fn in fns:
            name = getattr(fn, "__name__", "metric")
            tables[name] = pd.DataFrame({
                "NetworkImplementation": ["Floating-Point", "Quantized"],
                "MetricOutput": [float(fn(fs, labels)), float(fn(qs, labels))],
                "LearnableParameterMemory(bytes)": [fmem, qmem]})
        fc, qc = fs.argmax(1) == labels, qs.argmax(1) == labels
        errors = self.layer_errors(x[:error_images])
        return ValidationResult(len(x), tables, agreement(fs, qs), paired_bootstrap(fc, qc), mcnemar(fc, qc),
                                errors, source)

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

    # --- save / load ----------------------------------------------------------------------
    def save(self, path) -> None:
        """Write one portable file (zip of JSON and safetensors; no pickle)."""
        from .quant.io import save_quantizer

        save_quantizer(self, path)

    @classmethod
    def load(cls, path) -> "Quantizer":
        from .quant.io import load_quantizer

        return load_quantizer(path)

    def save_calibration(self, path) -> None:
        """Write the calibration statistics alone (to re-decide ranges elsewhere)."""
        from .quant.io import save_ranges

        save_ranges(self._require_ranges(), path)

    def load_calibration(self, path) -> None:
        """Read statistics written by :meth:`save_calibration`; they must come from this network."""
        from .quant.io import load_ranges

        ranges = load_ranges(path)
        mine = graph_fingerprint(self.graph)
        if ranges.fingerprint != mine:
            raise ValueError(f"{path}: calibration statistics of another network (fingerprint "
                             f"{ranges.fingerprint}, this network is {mine})")
        self.ranges = ranges
        self._qnet = None

    def __repr__(self) -> str:
        state = repr(self.ranges) if self.ranges is not None else "not calibrated"
        spec = f", input: {self.input_spec!r}" if self.input_spec is not None else ""
        return (f"Quantizer({self.name}, target={self.target}{spec}, {state}, "
                f"float layers: {sorted(self.user_float) or 'none'})")


def _md5(a: np.ndarray) -> str:
    import hashlib

    return hashlib.md5(a.tobytes()).hexdigest()


def _row_scale(s, qn, qnodes, op):
    """(scale, dtype, clipping threshold) of the tensor a table row describes."""
    if qn is None:
        return math.nan, "float32", math.nan
    if s.kind == "Weights" and "weight_scale" in qn.params:
        ws = qn.params["weight_scale"]
        return float(ws.max()), "int8", float((ws * 127).max())
    if s.kind == "Bias" and "weight_scale" in qn.params:
        src = qnodes[qn.inputs[0]]
        bs = src.scale * qn.params["weight_scale"]
        return float(bs.max()), "int32", float(bs.max() * (2 ** 31 - 1))
    if qn.quantized:
        levels = 255 if qn.dtype == "uint8" else 127
        return qn.scale, qn.dtype, qn.scale * levels
    if (f"{s.node}_quantize") in qnodes:  # a float tensor quantized on its way into an int layer
        q = qnodes[f"{s.node}_quantize"]
        return q.scale, q.dtype, q.scale * (255 if q.dtype == "uint8" else 127)
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
