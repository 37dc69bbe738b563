"""Saving and loading quantizers and calibration statistics: zip files of JSON and safetensors.

A quantizer file (format ``netquant.quantizer``, version 1) holds:

- ``manifest.json``: format and version, the network name, target, config, layers kept float,
  the input spec (``input_spec``, None or absent: the model takes netquant's images as they are),
  provenance (calibration data, its md5, netquant/torch/numpy versions), the graph structure and
  the statistics' scalars;
- ``graph.safetensors``: the float graph's parameters (after batch-norm folding);
- ``stats.safetensors``: the calibration histograms and per-channel ranges;
- ``int4.safetensors`` (only where the network has 4-bit layers): each 4-bit layer's weight codes
  two per byte and its weight scales (:func:`int4_weights`), checked on load against lowering.

Saving is atomic (the old file or the whole new one, see :mod:`netquant.fileio`). Loading checks
every member's inflated size before inflating it, the manifest's fields, every statistic
(:func:`check_stats`) and the fingerprint; any failure is a :class:`QuantizerFileError` naming the
file and the member (and the layer). Nothing is pickled. The integer network is not stored: it
is rebuilt from these by the same deterministic lowering, so a loaded quantizer gives the same integers bit for bit
(for 4-bit layers the file also holds the codes, and loading checks that lowering gives them).
"""
from __future__ import annotations

import json
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..calib.calibrate import graph_fingerprint
from ..calib.stats import RangeStats, RangeTable
from ..errors import MissingFileError, QuantizerFileError
from ..ir.graph import Graph, Node
from ..ir.input_spec import InputSpec
from .config import QuantConfig

FORMAT, FORMAT_VERSION = "netquant.quantizer", 1
RANGES_FORMAT = "netquant.calibration"


def _tensors_bytes(arrays: dict) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


def _tensors_load(data: bytes) -> dict:
    from safetensors.numpy import load

    return load(data)


def _jsonable(v):
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def _tuples(v):
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuples(x) for k, x in v.items()}
    return v


def graph_to_json(graph: Graph) -> tuple[dict, dict]:
    arrays, nodes = {}, []
    for i, n in enumerate(graph.nodes):
        for k, a in n.params.items():
            arrays[f"{i}/{k}"] = a
        nodes.append({"name": n.name, "op": n.op, "inputs": list(n.inputs), "shape": list(n.shape),
                      "attrs": _jsonable(n.attrs), "params": sorted(n.params), "layers": list(n.layers),
                      "reason": n.reason})
    return {"nodes": nodes, "output": graph.output, "source": graph.source}, arrays


def _check_node_json(i: int, d) -> None:
    """One node of a manifest's graph has the fields and types graph_to_json writes."""
    if not isinstance(d, dict):
        raise ValueError(f"node {i}: expected a JSON object, got {type(d).__name__}")
    types = {"name": str, "op": str, "inputs": list, "shape": list, "attrs": dict, "params": list, "layers": list}
    for key, kind in types.items():
        if not isinstance(d.get(key), kind):
            raise ValueError(f"node {i} ({d.get('name')!r}): field {key!r} should be {kind.__name__}, "
                             f"got {type(d.get(key)).__name__}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 31 for v in d["shape"]):
        raise ValueError(f"node {d['name']!r}: shape {d['shape']!r} is not a list of positive sizes")
    for key in ("inputs", "params", "layers"):
        if not all(isinstance(v, str) for v in d[key]):
            raise ValueError(f"node {d['name']!r}: {key} should be names")


def graph_from_json(meta: dict, arrays: dict) -> Graph:
    nodes = []
    for i, d in enumerate(meta["nodes"]):
        _check_node_json(i, d)
        nodes.append(Node(d["name"], d["op"], tuple(d["inputs"]), tuple(d["shape"]), _tuples(d["attrs"]),
                          {k: arrays[f"{i}/{k}"] for k in d["params"]}, tuple(d["layers"]), d["reason"]))
    return Graph(tuple(nodes), meta["output"], meta["source"])


def ranges_to_json(r: RangeTable) -> tuple[dict, dict]:
    arrays, stats = {}, []
    for i, s in enumerate(r):
        stats.append(s.to_json())
        for k, a in s.arrays().items():
            arrays[f"{i}/{k}"] = a
    return {"stats": stats, "images": r.images, "source": r.source, "fingerprint": r.fingerprint}, arrays


def ranges_from_json(meta: dict, arrays: dict) -> RangeTable:
    stats = {}
    for i, d in enumerate(meta["stats"]):
        a = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.split("/", 1)[0] == str(i)}
        s = RangeStats.from_saved(d, a)
        stats[s.key] = s
    return RangeTable(stats, meta["images"], meta["source"], meta["fingerprint"])


def _versions() -> dict:
    import torch

    from .. import __version__

    return {"netquant": __version__, "torch": torch.__version__, "numpy": np.__version__}


def _write_zip(path, files: dict) -> None:
    """Write the members into a zip at ``path`` atomically (temp file, fsync, rename): a save
    interrupted at any moment (SIGKILL, Ctrl-C, a full disk) leaves the old file whole."""
    from ..fileio import atomic_write

    with atomic_write(path, "wb") as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in files.items():
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # deterministic
                info.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(info, data)


# Inflated size limits, checked against the zip's central directory before anything is inflated
# (zipfile never inflates past a member's declared size: a lying header fails its CRC). A member
# may inflate to MEMBER_FLOOR bytes, or to MEMBER_RATIO times the whole file's size when that is
# more: weights barely compress (ratio ~1.1), histograms compress well but are small. So a
# 2.1 MB file whose graph member claims 2 GiB is refused (limit 256 MiB), and a 600 MB quantizer
# may hold members up to 12 GB.
MANIFEST_MAX_BYTES = 64 << 20
MEMBER_FLOOR, MEMBER_RATIO = 256 << 20, 20


class _Reader:
    """The members of one netquant zip, each read at most once, with size limits; every failure
    is a QuantizerFileError naming the file and the member."""

    def __init__(self, path: Path, z: zipfile.ZipFile, what: str):
        self.path, self.z, self.what = path, z, what
        self.file_bytes = path.stat().st_size

    def fail(self, member: str, text: str, layer: Optional[str] = None) -> QuantizerFileError:
        where = f"{self.path}: member {member}" + (f", layer {layer}" if layer else "")
        return QuantizerFileError(f"{where}: {text} (a corrupt or edited {self.what} file; save it again)")

    def read(self, member: str, limit: Optional[int] = None) -> bytes:
        try:
            info = self.z.getinfo(member)
        except KeyError:
            raise self.fail(member, "missing") from None
        limit = limit if limit is not None else max(MEMBER_FLOOR, MEMBER_RATIO * self.file_bytes)
        if info.file_size > limit:
            raise self.fail(member, f"inflates to {info.file_size:,} bytes, more than the {limit:,} allowed for a "
                                    f"{self.file_bytes:,}-byte file (a zip bomb?)")
        try:
            return self.z.read(info)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, NotImplementedError,
                ValueError) as e:
            raise self.fail(member, f"cannot be inflated ({type(e).__name__}: {e})") from e

    def tensors(self, member: str) -> dict:
        data = self.read(member)
        try:
            arrays = _tensors_load(data)
        except Exception as e:   # safetensors raises its own SafetensorError (and others) on bad bytes
            raise self.fail(member, f"not a safetensors blob ({type(e).__name__}: {e})") from e
        return arrays


def _read_zip(path, expected_format: str) -> tuple[dict, _Reader]:
    """(the manifest, a reader of the other members) of a netquant zip, format and version checked."""
    path = Path(path)
    what = "quantizer" if expected_format == FORMAT else "calibration"
    if not path.exists():
        raise MissingFileError(f"{path}: no such file")
    if not path.is_file():
        raise QuantizerFileError(f"{path}: not a file (expected a {what} file written by netquant)")
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise QuantizerFileError(f"{path}: not a {expected_format} file, or it is corrupt or truncated "
                                 f"({type(e).__name__}: {e})") from e
    reader = _Reader(path, z, what)
    raw = reader.read("manifest.json", MANIFEST_MAX_BYTES)
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise reader.fail("manifest.json", f"not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(manifest, dict):
        raise reader.fail("manifest.json", f"expected a JSON object, got a {type(manifest).__name__}")
    if manifest.get("format") != expected_format:
        raise QuantizerFileError(f"{path}: format {manifest.get('format')!r}, expected {expected_format!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise QuantizerFileError(f"{path}: {expected_format} version {manifest.get('format_version')!r}, this "
                                 f"netquant reads version {FORMAT_VERSION}")
    return manifest, reader


def _field(reader: _Reader, d, key: str, kind, where: str = "manifest.json"):
    """``d[key]``, which must be of ``kind`` (a type or tuple of types)."""
    if not isinstance(d, dict) or key not in d:
        raise reader.fail(where, f"the field {key!r} is missing")
    v = d[key]
    if not isinstance(v, kind) or isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise reader.fail(where, f"the field {key!r} should be {names}, got {type(v).__name__}")
    return v


def check_stats(s: RangeStats) -> Optional[str]:
    """What is inconsistent in one tensor's statistics, or None when they hold together.

    Checked: kind; count, zeros and histogram counts (non-negative integers that add up: every
    value is in one linear bin, and every value is zero or in one log2 bin); min <= max, both
    finite when count > 0; the histogram limit a power of two (or 0 for no values) with |min|,
    |max| <= limit; min and max inside the lowest and highest non-empty bins (bin i covers
    [(i - 1024) w, (i - 1023) w) with w = limit / 1024; e.g. limit 4: a max of 3.1 must be in a bin
    at or below 3.1 // (1/256) = 793 above the middle, and that bin must not be empty); the
    per-channel ranges finite, ordered and spanning exactly [min, max]. An edited max of NaN,
    0, -1 or 1e30 breaks at least one of these."""
    from ..calib.stats import HALF_BINS, KINDS, LOG2_MAX, LOG2_MIN

    if s.kind not in KINDS:
        return f"kind {s.kind!r}, expected one of {', '.join(KINDS)}"
    for name in ("count", "zeros"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return f"{name} {v!r}: expected a non-negative integer"
    for name in ("min", "max", "limit"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"{name} {v!r}: expected a number"
    for name, n in (("hist", 2 * HALF_BINS), ("log2_hist", LOG2_MAX - LOG2_MIN + 1)):
        a = getattr(s, name)
        if not isinstance(a, np.ndarray) or a.shape != (n,) or a.dtype.kind not in "iu":
            return f"{name}: expected {n} integer counts, got {getattr(a, 'dtype', type(a).__name__)} " \
                   f"{getattr(a, 'shape', '')}"
        if (a < 0).any():
            return f"{name}: negative counts"
    if s.zeros > s.count:
        return f"zeros {s.zeros} > count {s.count}"
    if int(s.hist.sum()) != s.count:
        return f"the histogram holds {int(s.hist.sum())} values, count says {s.count}"
    if int(s.log2_hist.sum()) + s.zeros != s.count:
        return f"the log2 histogram and zeros hold {int(s.log2_hist.sum()) + s.zeros} values, count says {s.count}"
    if s.count == 0:
        return None if s.channel_min is None and s.channel_max is None else "per-channel ranges with no values"
    if not (math.isfinite(s.min) and math.isfinite(s.max) and s.min <= s.max):
        return f"range [{s.min!r}, {s.max!r}]: expected finite min <= max"
    lim = float(s.limit)
    if not (math.isfinite(lim) and lim > 0 and math.frexp(lim)[0] == 0.5) or max(abs(s.min), abs(s.max)) > lim:
        return f"histogram limit {lim!r} with range [{s.min:g}, {s.max:g}]: expected a power of two >= |min|, |max|"
    w = lim / HALF_BINS
    nz = np.flatnonzero(s.hist)
    lo_bin, hi_bin = int(nz[0]) - HALF_BINS, int(nz[-1]) - HALF_BINS
    tol = 1e-6 * lim
    if not (lo_bin * w - tol <= s.min < (lo_bin + 1) * w + tol):
        return f"min {s.min:g} is not in the lowest non-empty histogram bin [{lo_bin * w:g}, {(lo_bin + 1) * w:g})"
    if not (hi_bin * w - tol <= s.max <= (hi_bin + 1) * w + tol):
        return f"max {s.max:g} is not in the highest non-empty histogram bin [{hi_bin * w:g}, {(hi_bin + 1) * w:g})"
    if (s.channel_min is None) != (s.channel_max is None):
        return "only one of channel_min and channel_max"
    if s.channel_min is not None:
        cmin, cmax = s.channel_min, s.channel_max
        if cmin.ndim != 1 or cmin.shape != cmax.shape or cmin.size == 0 or cmin.dtype.kind != "f" \
                or cmax.dtype.kind != "f":
            return f"per-channel ranges of shapes {cmin.shape} and {cmax.shape}: expected two equal (C,) float arrays"
        if not (np.isfinite(cmin).all() and np.isfinite(cmax).all() and (cmin <= cmax).all()):
            return "per-channel ranges not finite or min > max"
        if abs(float(cmin.min()) - s.min) > tol or abs(float(cmax.max()) - s.max) > tol:
            return (f"per-channel ranges span [{float(cmin.min()):g}, {float(cmax.max()):g}] but the tensor's range "
                    f"is [{s.min:g}, {s.max:g}]")
    return None


def _ranges(reader: _Reader, meta, graph: Optional[Graph]) -> RangeTable:
    """The RangeTable of ``meta`` (the manifest's ranges) and stats.safetensors, every statistic checked."""
    where = "manifest.json"
    stats_meta = _field(reader, meta, "stats", list)
    images = _field(reader, meta, "images", int)
    source = _field(reader, meta, "source", str)
    fingerprint = _field(reader, meta, "fingerprint", str)
    arrays = reader.tensors("stats.safetensors")
    groups: dict = {}
    for k, v in arrays.items():
        i, _, name = k.partition("/")
        groups.setdefault(i, {})[name] = v
    stats = {}
    fields = ("kind", "node", "layer", "count", "min", "max", "limit", "zeros")
    for i, d in enumerate(stats_meta):
        if not isinstance(d, dict) or set(d) != set(fields):
            raise reader.fail(where, f"statistics entry {i}: expected the fields {', '.join(fields)}")
        node = d["node"] if isinstance(d["node"], str) else repr(d["node"])
        if not isinstance(d["node"], str) or not isinstance(d["layer"], str):
            raise reader.fail(where, f"statistics entry {i}: node and layer must be names")
        a = groups.get(str(i), {})
        if "hist" not in a or "log2_hist" not in a:
            raise reader.fail("stats.safetensors", f"histograms of statistics entry {i} missing", node)
        try:
            s = RangeStats.from_saved(d, a)
        except (TypeError, ValueError) as e:
            raise reader.fail("stats.safetensors", f"statistics entry {i}: {e}", node) from e
        problem = check_stats(s)
        if problem:
            raise reader.fail("manifest.json" if "hist" not in problem else "stats.safetensors",
                              f"{s.kind} statistics: {problem}", node)
        if graph is not None and s.node not in graph.names():
            raise reader.fail(where, f"statistics of {s.node!r}, which is not a node of the stored network")
        if s.key in stats:
            raise reader.fail(where, f"statistics of {s.key!r} appear twice")
        stats[s.key] = s
    if isinstance(images, bool) or images < 0:
        raise reader.fail(where, f"calibration image count {images!r}")
    return RangeTable(stats, images, source, fingerprint)


@dataclass(frozen=True)
class SavedQuantizer:
    """Everything a quantizer file holds, as plain values: what :meth:`Quantizer.save` writes and
    what :meth:`Quantizer.load` builds a quantizer from (this module never imports the Quantizer)."""

    graph: Graph                 # the float graph, batch norms folded, input spec nodes included
    target: str
    config: QuantConfig
    name: str
    input_spec: Optional[InputSpec]   # recorded only: its nodes are already in ``graph``
    ranges: Optional[RangeTable]
    user_float: frozenset
    provenance: dict
    float_learnable_bytes: Optional[int]
    # the 4-bit layers' stored weights: on save, int4_weights(quantizer) (manifest entry, arrays);
    # on load, {layer: (bits, codes, scales)} from the file, which Quantizer.load checks against
    # lowering (check_int4); None without 4-bit layers
    int4: Optional[object] = None


def save_quantizer(q: SavedQuantizer, path) -> None:
    gmeta, garrays = graph_to_json(q.graph)
    files = {"graph.safetensors": _tensors_bytes(garrays)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": q.name, "target": q.target,
                "config": q.config.to_dict(), "float_layers": sorted(q.user_float),
                "float_learnable_bytes": q.float_learnable_bytes,
                "input_spec": q.input_spec.to_json() if q.input_spec is not None else None,
                "provenance": {**q.provenance, "versions": _versions()}, "graph": gmeta, "ranges": None}
    if q.ranges is not None:
        rmeta, rarrays = ranges_to_json(q.ranges)
        manifest["ranges"] = rmeta
        files["stats.safetensors"] = _tensors_bytes(rarrays)
    if q.int4:
        meta, arrays = q.int4
        manifest["int4_weights"] = meta
        files[INT4_MEMBER] = _tensors_bytes(arrays)
    files["manifest.json"] = json.dumps(manifest, indent=1, allow_nan=True).encode()
    _write_zip(path, files)


INT4_MEMBER = "int4.safetensors"


def int4_weights(q) -> Optional[tuple[dict, dict]]:
    """(manifest entry, arrays) of the 4-bit layers of ``q``'s integer network: per layer its
    codes two per byte (``<layer>/codes``, uint8, quant/int4.py) and weight scales
    (``<layer>/scale``, float64), with the weight shape and bits in the entry; None when ``q``
    is not calibrated, its config asks for no 4-bit layer, or it does not lower (nothing to
    store). The integer network is still rebuilt by lowering on load; these make the file say
    what the deployed 4-bit weights are, and loading checks the two agree bit for bit."""
    from .int4 import is_int4, pack, weight_bits

    cfg = q.config
    if q.ranges is None or (cfg.weight_bits > 4 and all(o.get("weight_bits", 8) > 4 for o in cfg.overrides.values())):
        return None
    try:
        qg = q.quantize().qgraph
    except ValueError:   # a config asking for what calibration did not apply: nothing lowered to store
        return None
    layers, arrays = {}, {}
    for n in qg.nodes:
        if is_int4(n):
            w = n.params["weight"]
            layers[n.name] = {"bits": weight_bits(n), "shape": list(w.shape)}
            arrays[f"{n.name}/codes"] = pack(w)
            arrays[f"{n.name}/scale"] = np.asarray(n.params["weight_scale"], np.float64)
    return ({"member": INT4_MEMBER, "layers": layers}, arrays) if layers else None


def _read_int4(reader: _Reader, manifest: dict) -> Optional[dict]:
    """{layer: (bits, int8 codes in the weight shape, scales)} of the file's 4-bit layers, or
    None when it has none; a malformed entry is a QuantizerFileError naming the layer."""
    from .int4 import packed_size, unpack

    meta = manifest.get("int4_weights")
    if meta is None:
        return None
    layers = _field(reader, meta, "layers", dict)
    arrays = reader.tensors(INT4_MEMBER)
    out = {}
    for name, d in layers.items():
        if not isinstance(d, dict) or not isinstance(d.get("shape"), list) or d.get("bits") not in (2, 3, 4) or \
                not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in d["shape"]):
            raise reader.fail("manifest.json", f"int4_weights entry {d!r}: expected bits 2..4 and a weight shape", name)
        codes, scale = arrays.get(f"{name}/codes"), arrays.get(f"{name}/scale")
        count = math.prod(d["shape"])
        if codes is None or scale is None or codes.dtype != np.uint8 or codes.shape != (packed_size(count),) \
                or scale.dtype != np.float64 or scale.shape != (d["shape"][0],):
            raise reader.fail(INT4_MEMBER, f"expected {packed_size(count)} packed bytes (uint8) and "
                                           f"{d['shape'][0]} scales (float64)", name)
        out[name] = (d["bits"], unpack(codes, count).reshape(d["shape"]), scale)
    return out


def check_int4(path, q, stored: dict) -> None:
    """The 4-bit weights the file stores are those lowering gives for its network (codes and
    scales bit for bit), else a QuantizerFileError naming the layer."""
    from .int4 import is_int4, weight_bits

    if q.ranges is None:
        raise QuantizerFileError(f"{path}: member {INT4_MEMBER}: 4-bit weights but no calibration statistics")
    try:
        qg = q.quantize().qgraph
    except ValueError as e:
        raise QuantizerFileError(f"{path}: member {INT4_MEMBER}: the stored network does not lower ({e})") from e
    lowered = {n.name: n for n in qg.nodes if is_int4(n)}
    if set(lowered) != set(stored):
        odd = sorted(set(lowered) ^ set(stored))[0]
        raise QuantizerFileError(f"{path}: member {INT4_MEMBER}, layer {odd}: the file's 4-bit layers "
                                 f"({len(stored)}) are not those lowering gives ({len(lowered)})")
    for name, (bits, codes, scale) in stored.items():
        n = lowered[name]
        if bits != weight_bits(n) or not np.array_equal(codes, n.params["weight"]) or \
                not np.array_equal(scale, n.params["weight_scale"]):
            raise QuantizerFileError(f"{path}: member {INT4_MEMBER}, layer {name}: the stored 4-bit weights differ "
                                     f"from those lowering gives for the stored network (an edited file, or one "
                                     f"written by another netquant version; save it again)")


def load_quantizer(path) -> SavedQuantizer:
    """What the quantizer file at ``path`` holds; every member is size-capped before it is
    inflated, and the graph, configuration and statistics are checked: any failure is one
    QuantizerFileError naming the file and the member (and the layer)."""
    manifest, reader = _read_zip(path, FORMAT)
    ranges = None
    with reader.z:
        gmeta = _field(reader, manifest, "graph", dict)
        garrays = reader.tensors("graph.safetensors")
        try:
            graph = graph_from_json(gmeta, garrays)
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise reader.fail("manifest.json", f"the network does not load ({type(e).__name__}: {e})") from e
        for n in graph.nodes:
            for k, a in n.params.items():
                if not isinstance(a, np.ndarray) or (a.dtype.kind == "f" and not np.isfinite(a).all()):
                    raise reader.fail("graph.safetensors", f"parameter {k} holds NaN or inf values", n.name)
        target = _field(reader, manifest, "target", str)
        name = _field(reader, manifest, "name", str)
        try:
            config = QuantConfig.from_dict(_field(reader, manifest, "config", dict))
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:   # what an edited value raises
            raise reader.fail("manifest.json", f"config: {type(e).__name__}: {e}") from e
        spec = manifest.get("input_spec")   # files written before input specs have none
        try:
            input_spec = InputSpec.from_json(spec) if spec is not None else None
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
            raise reader.fail("manifest.json", f"input_spec: {type(e).__name__}: {e}") from e
        if manifest.get("ranges") is not None:
            ranges = _ranges(reader, manifest["ranges"], graph)
        int4 = _read_int4(reader, manifest)
    if ranges is not None and ranges.fingerprint != graph_fingerprint(graph):
        raise QuantizerFileError(f"{path}: its calibration statistics do not belong to its network (fingerprint "
                                 f"{ranges.fingerprint}, the stored network is {graph_fingerprint(graph)})")
    floats = _field(reader, manifest, "float_layers", list)
    known = set(graph.names()) | {layer for n in graph.nodes for layer in n.layers}
    bad = [f for f in floats if not isinstance(f, str) or f not in known]
    if bad:
        raise reader.fail("manifest.json", f"float_layers names {bad[0]!r}, not a layer of the stored network")
    provenance = _field(reader, manifest, "provenance", dict)
    fbytes = manifest.get("float_learnable_bytes") or None
    if fbytes is not None and (isinstance(fbytes, bool) or not isinstance(fbytes, int) or fbytes < 0):
        raise reader.fail("manifest.json", f"float_learnable_bytes {fbytes!r}: expected a byte count")
    return SavedQuantizer(graph, target, config, name, input_spec, ranges, frozenset(floats), provenance, fbytes,
                          int4)


def save_ranges(r: RangeTable, path) -> None:
    meta, arrays = ranges_to_json(r)
    _write_zip(path, {"manifest.json": json.dumps({"format": RANGES_FORMAT, "format_version": FORMAT_VERSION,
                                                   "ranges": meta}).encode(),
                      "stats.safetensors": _tensors_bytes(arrays)})


def load_ranges(path) -> RangeTable:
    """The calibration statistics saved at ``path``, checked like a quantizer's (each statistic
    finite and consistent); any failure is one QuantizerFileError naming the file and member."""
    manifest, reader = _read_zip(path, RANGES_FORMAT)
    with reader.z:
        return _ranges(reader, _field(reader, manifest, "ranges", dict), None)
