"""Saving and loading quantizers and calibration statistics: zip files of JSON and safetensors.

A quantizer file (format ``netquant.quantizer``, version 1) holds:

- ``manifest.json``: format and version, the network name, target, config, layers kept float,
  the input spec (``input_spec``, None or absent: the model takes netquant's images as they are),
  provenance (calibration data, its md5, netquant/torch/numpy versions), the graph structure and
  the statistics' scalars;
- ``graph.safetensors``: the float graph's parameters (after batch-norm folding);
- ``stats.safetensors``: the calibration histograms and per-channel ranges.

Nothing is pickled. The integer network is not stored: it is rebuilt from these by the same
deterministic lowering, so a loaded quantizer gives the same integers bit for bit.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from ..calib.stats import RangeStats, RangeTable
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


def graph_from_json(meta: dict, arrays: dict) -> Graph:
    nodes = []
    for i, d in enumerate(meta["nodes"]):
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
    path = Path(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # deterministic
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    path.write_bytes(buf.getvalue())


def _read_zip(path, expected_format: str) -> tuple[dict, zipfile.ZipFile]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        z = zipfile.ZipFile(path)
        manifest = json.loads(z.read("manifest.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as e:
        raise ValueError(f"{path}: not a {expected_format} file, or it is corrupt ({e})") from e
    if manifest.get("format") != expected_format:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {expected_format!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: {expected_format} version {manifest.get('format_version')}, this netquant reads "
                         f"version {FORMAT_VERSION}")
    return manifest, z


def save_quantizer(q, path) -> None:
    gmeta, garrays = graph_to_json(q.graph)
    files = {"graph.safetensors": _tensors_bytes(garrays)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": q.name, "target": q.target,
                "config": q.config.to_dict(), "float_layers": sorted(q.user_float),
                "float_learnable_bytes": getattr(q, "float_learnable_bytes", None),
                "input_spec": q.input_spec.to_json() if q.input_spec is not None else None,
                "provenance": {**q.provenance, "versions": _versions()}, "graph": gmeta, "ranges": None}
    if q.ranges is not None:
        rmeta, rarrays = ranges_to_json(q.ranges)
        manifest["ranges"] = rmeta
        files["stats.safetensors"] = _tensors_bytes(rarrays)
    files["manifest.json"] = json.dumps(manifest, indent=1, allow_nan=True).encode()
    _write_zip(path, files)


def load_quantizer(path):
    from ..calib.calibrate import graph_fingerprint
    from ..quantizer import Quantizer

    manifest, z = _read_zip(path, FORMAT)
    try:
        graph = graph_from_json(manifest["graph"], _tensors_load(z.read("graph.safetensors")))
        q = Quantizer(graph=graph, target=manifest["target"], config=QuantConfig.from_dict(manifest["config"]),
                      name=manifest["name"])
        # the stored graph already holds the spec's nodes: record the spec, do not apply it again
        spec = manifest.get("input_spec")   # files written before input specs have none
        q.input_spec = InputSpec.from_json(spec) if spec is not None else None
        if manifest["ranges"] is not None:
            q.ranges = ranges_from_json(manifest["ranges"], _tensors_load(z.read("stats.safetensors")))
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: corrupt quantizer file ({type(e).__name__}: {e})") from e
    if q.ranges is not None and q.ranges.fingerprint != graph_fingerprint(graph):
        raise ValueError(f"{path}: its calibration statistics do not belong to its network")
    q.user_float = frozenset(manifest["float_layers"])
    q.provenance = manifest["provenance"]
    if manifest.get("float_learnable_bytes"):
        q.float_learnable_bytes = manifest["float_learnable_bytes"]
    return q


def save_ranges(r: RangeTable, path) -> None:
    meta, arrays = ranges_to_json(r)
    _write_zip(path, {"manifest.json": json.dumps({"format": RANGES_FORMAT, "format_version": FORMAT_VERSION,
                                                   "ranges": meta}).encode(),
                      "stats.safetensors": _tensors_bytes(arrays)})


def load_ranges(path) -> RangeTable:
    manifest, z = _read_zip(path, RANGES_FORMAT)
    try:
        return ranges_from_json(manifest["ranges"], _tensors_load(z.read("stats.safetensors")))
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: corrupt calibration file ({e})") from e
