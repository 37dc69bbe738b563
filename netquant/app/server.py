"""The Deep Network Quantizer app: a local web server over the netquant API.

    netquant app [--port N] [--no-browser] [--host 127.0.0.1]

The network is a shipped one, a netquant ``.safetensors`` or any ONNX CNN (a path on this
machine or an upload), with an optional input spec (channel order, pixel range, mean/std) for
models that expect other than [0, 1] RGB. Data sets are CIFAR-10 (the default, for networks
that take 3x32x32 images), an uploaded ``.zip`` of an image folder (one sub-folder per class)
or ``.npz``, or a path; each is resized to the network's input, and calibration and validation
each pick one.

API (JSON in and out; uploads are the raw request body with Content-Type
application/octet-stream and their options in the query string):

    GET  /api/networks                       shipped networks, targets, range methods, default data
    POST /api/sessions                       {network | model_path, target, activation_range,
                                              input_spec, input_shape}; or an uploaded model
                                              (?filename=net.onnx&input_spec=JSON&target=...)
    POST /api/import                         an uploaded .nq quantizer file
    GET  /api/sessions/ID                    the session: network, input shape, data sets
    POST /api/sessions/ID/data               {path, class_names}; or an uploaded .zip/.npz
                                              (?filename=images.zip&class_names=a,b,c)
    POST /api/sessions/ID/calibrate          {data, count, seed}; or an uploaded .npy array
    POST /api/sessions/ID/layers             {layer, quantize} or {layer, precision: float | int8 | w4a8}
    POST /api/sessions/ID/config             the scheme: {weight_granularity, scale, activation_range,
                                              weight_range, percentile, overrides}
    POST /api/sessions/ID/validate           {data, count, seed, metrics}
    POST /api/sessions/ID/sensitivity        {data, count, seed, metric}: the per-layer sensitivity table
    POST /api/sessions/ID/auto_precision     {data, count, seed, metric, max_drop, max_evaluations}: the
                                              accuracy-budget search; its choice becomes the session's
    POST /api/sessions/ID/codegen            {target: "c" | "cuda" (gpu sessions)}
    GET  /api/sessions/ID/job | calibration | validation | sensitivity | auto_precision
    GET  /api/sessions/ID/export/{quantizer,onnx,code,report}

Security: it binds to 127.0.0.1 unless told otherwise (with a warning); every request, pages
and assets included, must carry the random access token printed with the URL (query ``token``
or header ``X-Token``) and a Host header naming this server (against DNS rebinding; 421
otherwise); a body's size is decided from its Content-Length before a byte is read (missing:
411, negative: 400, over the limit: 413); uploads are size-limited (archives also by what they expand to), parsed
without pickle and written only into the session's temporary folder under names the server
makes up; uploaded ONNX models are read from memory, so they cannot reach other files through
external data; static files come from a fixed list (no paths from the request reach the file
system); custom metrics are importable ``module:function`` names only (looked up in the
directory the app was started from first). Every failure, expected or not, is answered with a
JSON ``{"error": message}``: 400 bad input, 404, 409 not now (busy, not calibrated), 413, 429
(as many sessions as the server keeps), and 500 for anything unforeseen, with an id that the
server log shows next to the traceback.

Sessions: the page keeps the session id in its address, so a reload finds it again; a session
unused for ``idle_timeout`` seconds (an hour by default) expires and its files are deleted; all
files are deleted when the server stops, SIGINT and SIGTERM included. An exported quantizer
file carries the last validation results, so importing it restores them with the calibration.
"""
from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
import webbrowser
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, urlparse

import numpy as np

from .. import fileio
from ..errors import ArgumentError, NetquantError, NotFoundError
from ..quant.config import CODEGEN_TARGETS, GRANULARITIES, RANGE_METHODS, SCALES, TARGETS
from .inputs import (DATA_SUFFIXES, MODEL_SUFFIXES, HttpError, check_archive, data_kind, load_npy,
                     make_input_spec, model_kind, parse_class_names, parse_count, safe_name, shape_arg,
                     spec_fields, to_int)
from .sessions import (Busy, DataSet, Full, PredictionRecorder, Registry, calibration_json, metric_unit,
                       per_class_json, search_json, sensitivity_json, validation_json, zip_folder)

log = logging.getLogger(__name__)

MAX_UPLOAD = 256 * 1024 * 1024     # a model or data set upload (ResNet-50 in ONNX is 100 MB)
MAX_EXPANDED = 1024 * 1024 * 1024  # what an uploaded zip/npz may expand to
MAX_JSON = 1024 * 1024
CIFAR, CIFAR_SHAPE = "cifar10", (3, 32, 32)
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/app.css": ("app.css", "text/css; charset=utf-8")}
IDLE_TIMEOUT = 3600.0             # seconds a session may go unused before it expires with its files
MAX_SESSIONS = 100
BACKLOG = 128                     # queued connections: a burst of 64 at once is answered, not reset
RESULTS = "app-session.json"      # the page's results, stored in an exported quantizer file
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"
# the code generation report styles itself inline and runs no script
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
METRIC_NAME = re.compile(r"^(top1|top5|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")


class App:
    """State shared by the request handlers: token, sessions, the default data set (CIFAR-10)."""

    def __init__(self, data_spec=None, token: Optional[str] = None, max_upload: int = MAX_UPLOAD,
                 max_expanded: int = MAX_EXPANDED, idle_timeout: float = IDLE_TIMEOUT,
                 max_sessions: int = MAX_SESSIONS, workdir=None):
        self.token = token or secrets.token_urlsafe(24)
        self.registry = Registry(idle_timeout=idle_timeout, max_sessions=max_sessions)
        # custom metrics ("mymetrics:accuracy") are looked up here first, as `python -c` would
        self.workdir = str(Path(workdir or os.getcwd()).resolve())
        self.data_spec = data_spec
        self.max_upload = max_upload
        self.max_expanded = max_expanded
        self._data = None
        self._data_lock = threading.Lock()

    @property
    def data(self):
        with self._data_lock:
            if self._data is None:
                from ..data import load_cifar10

                self._data = load_cifar10(self.data_spec)
            return self._data

    @property
    def cifar(self) -> DataSet:
        """The default data set: CIFAR-10's training images for calibration, test images for
        validation."""
        from ..data import CLASSES

        data = self.data
        return DataSet(CIFAR, "CIFAR-10", data.train, data.test, tuple(CLASSES))

    # --- API ------------------------------------------------------------------------------
    def networks(self) -> dict:
        from ..models.pretrained import list_pretrained

        return {"networks": list_pretrained(), "targets": list(TARGETS),
                "range_methods": list(RANGE_METHODS), "granularities": list(GRANULARITIES),
                "scales": list(SCALES), "data": self.data.test.source,
                "model_files": list(MODEL_SUFFIXES), "data_files": list(DATA_SUFFIXES),
                "channel_orders": ["RGB", "BGR"], "value_ranges": [[0.0, 1.0], [0.0, 255.0]]}

    def new_session(self, body: dict, model_blob: Optional[bytes] = None) -> dict:
        """A session for a shipped network (``network``), a model file on this machine
        (``model_path``: ``.onnx`` or netquant ``.safetensors``) or an uploaded one (``model_blob``,
        its kind from ``filename``), with an optional ``input_spec`` (an object or its JSON text:
        channel_order, value_range, mean, std) and, for ONNX models with free sizes,
        ``input_shape`` ("C,H,W")."""
        from dataclasses import replace

        from ..quant.config import target_config

        network = str(body.get("network") or "cifarnet-20-16")
        target = str(body.get("target") or "gpu")
        if target not in TARGETS:
            raise HttpError(400, f"target {target!r}: expected one of {', '.join(TARGETS)}")
        changes = {k: body[k] for k in ("scale", "weight_granularity", "activation_range") if body.get(k)}
        try:
            config = replace(target_config(target), **changes)
        except (TypeError, ValueError) as e:
            raise HttpError(400, f"scheme: {e}")
        input_shape = shape_arg(body.get("input_shape"))
        spec = spec_fields(body.get("input_spec"))
        s = self.registry.create()  # its folder receives the upload; listed once it has a quantizer
        try:
            if model_blob is not None:
                filename = str(body.get("filename") or "")
                kind = model_kind(filename, model_blob)
                path = s.folder / f"uploaded-model{kind}"
                fileio.write_bytes(path, model_blob)
                # ONNX from bytes: an upload cannot point the loader at external-data files
                source, name = (model_blob if kind == ".onnx" else path), safe_name(filename)
                label = "upload" if filename or kind != ".onnx" else "upload (no filename; not safetensors, so read as ONNX)"
            elif body.get("model_path"):
                path = Path(str(body["model_path"])).expanduser()
                if not path.is_file():
                    raise HttpError(400, f"model_path {path}: no such model file")
                kind = path.suffix.lower()
                if kind not in MODEL_SUFFIXES:
                    raise HttpError(400, f"model_path {path}: expected a {' or '.join(MODEL_SUFFIXES)} file")
                source, name, label = path, path.stem, f"model_path {path}"
            else:
                kind, source, name, label = "shipped", network, network, f"network {network}"
            s.quantizer = _make_quantizer(kind, source, name, label, target, config, input_shape, spec)
        except BaseException:
            self.registry.discard(s)
            raise
        return self._publish(s)

    def _publish(self, s) -> dict:
        """Register a session whose quantizer is ready and return its description."""
        s.network = s.quantizer.name
        out = self.session_json(s)  # first: it may load CIFAR-10, longer than a short idle timeout
        self.registry.register(s)
        return out

    def import_quantizer(self, blob: bytes) -> dict:
        from ..quantizer import Quantizer

        s = self.registry.create()
        path = s.folder / "imported.nq"
        try:
            fileio.write_bytes(path, blob)
            try:
                s.quantizer = Quantizer.load(path)
            except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
                # the message names the server's file; the user knows it as the upload
                raise HttpError(400, "not a quantizer file: " + str(e).replace(str(path), "the upload"))
            s.validation = _saved_results(path)
        except BaseException:
            self.registry.discard(s)
            raise
        return self._publish(s)

    def export_quantizer(self, s) -> bytes:
        """The session's quantizer file, with the page's last validation in it (``RESULTS``), so
        importing it restores the results as well as the calibration."""
        path = s.folder / "export.nq"
        s.quantizer.save(path)
        if s.validation is not None:
            with zipfile.ZipFile(path, "a") as z:
                z.writestr(RESULTS, json.dumps(s.validation, allow_nan=False))
        return path.read_bytes()

    def session_json(self, s) -> dict:
        q = s.quantizer
        spec = getattr(q, "input_spec", None)
        out = {"id": s.id, "network": s.network, "target": getattr(q, "target", ""),
                "calibrated": q.ranges is not None, "validated": s.validation is not None,
                "sensitivity": s.sensitivity is not None, "searched": s.search is not None,
                "codegen": s.codegen_target if s.codegen is not None else "",
                "float_layers": sorted(q.user_float), "config": q.config.to_dict(),
                "input_shape": list(q.graph.input.shape), "outputs": _outputs(q.graph),
                "input_spec": spec.to_json() if spec is not None else None, "datasets": self.datasets(s)}
        s.last_used = time.monotonic()  # building the reply can take long (the first CIFAR-10 load)
        return out

    # --- data sets ------------------------------------------------------------------------
    def datasets(self, s) -> list:
        """The data sets this session can use: CIFAR-10 when the network takes 3x32x32 images,
        then the ones added to the session."""
        out = [self.cifar.to_json()] if _input_shape(s) == CIFAR_SHAPE else []
        return out + [d.to_json() for d in list(s.datasets.values()) if d is not None]  # None: still loading

    def dataset(self, s, did) -> DataSet:
        did = str(did or CIFAR)
        if did == CIFAR:
            shape = _input_shape(s)
            if shape != CIFAR_SHAPE:
                raise HttpError(400, f"data set {CIFAR}: CIFAR-10 images are 3x32x32 but {s.network} takes "
                                     f"{'x'.join(map(str, shape))} images; add a data set (an image folder zip, "
                                     f"an .npz or a path), it is resized to the network's input")
            return self.cifar
        d = s.datasets.get(did)
        if d is None:
            ready = [k for k, v in list(s.datasets.items()) if v is not None]
            have = ", ".join([CIFAR] * (_input_shape(s) == CIFAR_SHAPE) + ready) or "none"
            raise HttpError(400, f"no data set {did!r} in session {s.id} (have: {have})")
        return d

    def add_data(self, sid: str, body: dict, blob: Optional[bytes] = None) -> dict:
        """Add a data set to a session, resized to its network's input: an uploaded ``.zip`` of an
        image folder (one sub-folder per class) or ``.npz`` (``blob``, kind from ``filename``), or
        ``path`` on this machine (a folder, zip, npz, CIFAR-10 archive, or a folder with train/
        and val/ sub-folders). ``class_names`` (a list or comma-separated text) names the
        network's classes in its output order, so folder names map to the right outputs."""
        from ..data import load_images, open_data

        s = self.registry.get(sid)
        shape = _input_shape(s)
        if len(shape) != 3:
            raise HttpError(400, f"{s.network} takes input of shape {shape}, not images (C, H, W)")
        size = tuple(shape[1:])
        # image files decode to what the network takes: RGB, or grey for a one-channel network
        kw = {"size": size, "class_names": parse_class_names(body.get("class_names")),
              "channels": 1 if shape[0] == 1 else 3}
        with s.lock:  # two uploads at once get different numbers
            n = max([int(k[4:]) for k in s.datasets] + [0]) + 1
            did = f"data{n}"
            s.datasets[did] = None  # reserved
        try:
            if blob is not None:
                filename = str(body.get("filename") or "")
                kind = data_kind(filename, blob)
                path = s.folder / f"data-{n}{kind}"
                fileio.write_bytes(path, blob)
                name = safe_name(filename) or path.name
                check_archive(path, self.max_expanded, name)
                train = test = _named(lambda: load_images(path, **kw), name, (str(path), filename or path.name))
                # provenance names the upload, not the server's temporary file
                train = test = dataclasses.replace(train, source=train.source.replace(
                    str(path), f"upload {filename or path.name}"))
            elif body.get("path"):
                path = Path(str(body["path"])).expanduser()
                if not path.exists():
                    raise HttpError(400, f"data path {path}: no such file or folder")
                name = path.name
                both = _named(lambda: open_data(path, **kw), name)
                train, test = both.train, both.test
            else:
                raise HttpError(400, "add a data set: upload a .zip or .npz, or give a path")
            for split, images in (("training", train), ("validation", test)):
                if tuple(images.images.shape[1:]) != tuple(shape):
                    raise HttpError(400, f"data set {name}: its {split} images are "
                                         f"{'x'.join(map(str, images.images.shape[1:]))} but {s.network} takes "
                                         f"{'x'.join(map(str, shape))}")
            got = getattr(test, "class_names", None) or getattr(train, "class_names", None)
            d = DataSet(did, name, train, test, tuple(kw["class_names"] or got or ()) or None)
        except BaseException:
            s.datasets.pop(did, None)
            raise
        s.datasets[did] = d
        log.info("session %s: data set %s (%s)", s.id, did, d.test.source)
        return {**d.to_json(), "datasets": self.datasets(s)}

    # --- jobs -----------------------------------------------------------------------------
    def calibrate(self, sid: str, body: dict, upload: Optional[bytes]) -> dict:
        from ..data import calibration_set

        s = self.registry.get(sid)
        if upload is not None:
            images = load_npy(upload, s.folder, _input_shape(s))
            source = f"{len(images)} uploaded images"
        else:
            data = self.dataset(s, body.get("data"))
            count, seed = parse_count(body.get("count", 200)), to_int(body.get("seed", 0), "seed")
            images = calibration_set(data, count, seed)
            source = images.source

        def work(progress):
            s.quantizer.calibrate(images, progress=progress)
            s.results_changed()

        s.run("calibrate", work)
        return {"started": "calibrate", "source": source}

    def set_layer(self, sid: str, body: dict) -> dict:
        s = self.registry.get(sid)
        if "precision" in body:
            return self.set_precision(s, body)
        try:
            s.quantizer.set_quantize(str(body["layer"]), bool(body["quantize"]))
        except KeyError as e:
            raise HttpError(400, str(e).strip("'\""))
        except ValueError as e:
            raise HttpError(400, str(e))
        # the results shown were measured on the network as it was: they go, and the page says so
        return {"float_layers": sorted(s.quantizer.user_float), "results_cleared": s.results_changed()}

    def set_precision(self, s, body: dict) -> dict:
        """A conv or fully connected layer's precision: "float" (kept in float), "int8" or "w4a8"
        (4-bit weights, a ``weight_bits`` override of the scheme)."""
        from ..accuracy.search import CHOICES, configure

        precision, layer = str(body.get("precision")), str(body.get("layer", ""))
        if precision not in CHOICES:
            raise HttpError(400, f"precision {precision!r}: expected one of {', '.join(CHOICES)}")
        try:
            node = s.quantizer.graph.find_layer(layer)
        except KeyError as e:
            raise HttpError(400, str(e).strip("'\""))
        if node.op not in ("conv", "linear"):
            raise HttpError(400, f"{layer} is a {node.op} layer; the precision choice is for conv and fully connected "
                                 f"layers (others follow their inputs: tick or untick them)")
        q = s.quantizer
        with s.lock:
            if s.job.state == "running":
                raise Busy(f"session {s.id} is busy: {s.job.kind} is running")
            config, uf = configure(q.config, q.user_float - {node.name, *node.layers}, {node.name: precision})
            q.user_float = uf
            q.set_config(config)
        return {"float_layers": sorted(q.user_float), "config": q.config.to_dict(),
                "results_cleared": s.results_changed()}

    def set_config(self, sid: str, body: dict) -> dict:
        """Change the quantization scheme: any of weight_granularity, scale, activation_range,
        weight_range, percentile and per-layer ``overrides`` ({layer: {activation_range: ...}});
        the results measured with the old scheme are cleared."""
        from dataclasses import replace

        s = self.registry.get(sid)
        fields = ("weight_granularity", "scale", "activation_range", "weight_range", "percentile", "overrides")
        unknown = set(body) - set(fields)
        if unknown:
            raise HttpError(400, f"scheme: unknown field(s) {sorted(unknown)}; expected {', '.join(fields)}")
        overrides = body.get("overrides", s.quantizer.config.overrides)
        if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
            raise HttpError(400, f"scheme overrides: expected {{layer: {{field: value}}}}, got {overrides!r}")
        for layer in overrides:
            try:
                s.quantizer.graph.find_layer(layer)
            except KeyError as e:
                raise HttpError(400, f"scheme overrides: {str(e).strip(chr(39) + chr(34))}")
        try:
            config = replace(s.quantizer.config, **{**body, "overrides": overrides})
        except (TypeError, ValueError) as e:
            raise HttpError(400, f"scheme: {e}")
        with s.lock:
            if s.job.state == "running":
                raise Busy(f"session {s.id} is busy: {s.job.kind} is running")
            s.quantizer.set_config(config)
        return {"config": config.to_dict(), "results_cleared": s.results_changed()}

    def validate(self, sid: str, body: dict) -> dict:
        from ..data import validation_set

        s = self.registry.get(sid)
        metrics = [str(m) for m in body.get("metrics", ["top1", "top5"])]
        if not isinstance(body.get("metrics", []), list):
            raise HttpError(400, f"metrics: expected a list of names, got {body.get('metrics')!r}")
        units = {}
        for m in metrics:
            fn = self._checked_metric(m)
            # the result table is named by the metric's text or its function's name
            units[m] = units[getattr(fn, "__name__", m)] = metric_unit(fn)
        data = self.dataset(s, body.get("data"))
        images = validation_set(data, parse_count(body.get("count", 50)), to_int(body.get("seed", 0), "seed"))
        if s.quantizer.ranges is None:
            raise HttpError(409, "calibrate first: the quantizer has no calibration statistics")

        def work(progress):
            recorder = PredictionRecorder()
            result = s.quantizer.validate(images, metrics=metrics + [recorder], progress=progress)
            # the last two calls score the whole set, float then int8 (a first call may probe a few images)
            runs = [r for r in recorder.runs if len(r) == len(images.labels)][-2:]
            per_class = per_class_json(images.labels, *runs, data) if len(runs) == 2 else []
            s.validation = validation_json(result, s.quantizer, per_class, data, units)

        s.run("validate", work)
        return {"started": "validate", "source": images.source}

    def _images_and_metric(self, s, body: dict, default_count: int):
        """(validation images, metric name) of a sensitivity or search request."""
        from ..data import validation_set

        metric = str(body.get("metric") or "top1")
        self._checked_metric(metric)
        data = self.dataset(s, body.get("data"))
        images = validation_set(data, parse_count(body.get("count", default_count)), to_int(body.get("seed", 0), "seed"))
        if s.quantizer.ranges is None:
            raise HttpError(409, "calibrate first: the quantizer has no calibration statistics")
        return images, metric

    def sensitivity(self, sid: str, body: dict) -> dict:
        """Start the sensitivity sweep (:meth:`Quantizer.sensitivity`) on validation images."""
        s = self.registry.get(sid)
        images, metric = self._images_and_metric(s, body, 200)

        def work(progress):
            table = s.quantizer.sensitivity(images, metric=self._metric(metric), progress=progress)
            s.sensitivity = {**sensitivity_json(table), "source": images.source}

        s.run("sensitivity", work)
        return {"started": "sensitivity", "source": images.source}

    def auto_precision(self, sid: str, body: dict) -> dict:
        """Start the accuracy-budget search (:meth:`Quantizer.auto_precision`); its choice
        becomes the session's quantizer (the layer ticks and bit widths follow)."""
        s = self.registry.get(sid)
        images, metric = self._images_and_metric(s, body, 500)
        try:
            max_drop = float(body.get("max_drop", 0.1))
            max_evaluations = int(body.get("max_evaluations", 64))
        except (TypeError, ValueError):
            raise HttpError(400, f"max_drop and max_evaluations: expected numbers, got {body.get('max_drop')!r} and "
                                 f"{body.get('max_evaluations')!r}")
        if not (max_drop >= 0 and max_evaluations >= 1):
            raise HttpError(400, f"max_drop must be >= 0 and max_evaluations >= 1, got {max_drop} and {max_evaluations}")

        def work(progress):
            result = s.quantizer.auto_precision(images, max_drop=max_drop, metric=self._metric(metric),
                                                max_evaluations=max_evaluations, progress=progress)
            s.quantizer = result.quantizer
            s.results_changed()
            s.search = {**search_json(result), "max_drop": max_drop, "source": images.source,
                        "metric": metric}

        s.run("auto_precision", work)
        return {"started": "auto_precision", "source": images.source}

    def _checked_metric(self, m: str):
        """The metric function named ``m`` (top1, top5 or the user's module:function); 400 for
        anything else, the standard library's functions included."""
        if not METRIC_NAME.match(m):
            raise HttpError(400, f"metric {m!r}: use top1, top5 or an importable module:function name")
        if ":" in m and m.split(".")[0].split(":")[0] in sys.stdlib_module_names | {"builtins"}:
            raise HttpError(400, f"metric {m!r}: a metric must come from your own module, not the standard library")
        try:
            return self._metric(m)
        except ValueError as e:
            raise HttpError(400, f"{e}; custom metrics are imported from {self.workdir} (where the app "
                                 f"was started) or PYTHONPATH")

    def _metric(self, name: str):
        """The metric function for ``name``; ``module:function`` is looked up in the app's
        working directory first (the console script does not put it on sys.path)."""
        from ..metrics import resolve_metric

        if ":" in name and self.workdir not in sys.path:
            sys.path.insert(0, self.workdir)
        return resolve_metric(name)

    def codegen(self, sid: str, body: dict) -> dict:
        """Generate code for ``target`` "c" (built and loaded here, so it is known to compile)
        or "cuda" (sessions for the "gpu" environment; built when nvcc is on PATH)."""
        import shutil

        from ..codegen import generate, load

        s = self.registry.get(sid)
        target = str(body.get("target") or "c")
        targets = tuple(t for t in CODEGEN_TARGETS if t != "micro")   # the micro target runs on a board, not here
        if target not in targets:
            raise HttpError(400, f"code generation target {target!r}: expected one of {', '.join(targets)}")
        if target == "cuda" and s.quantizer.target != "gpu":
            raise HttpError(400, f"CUDA code is for the gpu environment; this session's is {s.quantizer.target}")
        if s.quantizer.ranges is None:
            raise HttpError(409, "calibrate first: code is generated from the quantized network")
        folder = s.folder / f"codegen-{target}"

        def work(progress):
            shutil.rmtree(folder, ignore_errors=True)
            gen = generate(s.quantizer.quantize(), folder, name="net", target=target, progress=progress)
            built = target == "c" or shutil.which("nvcc") is not None
            if built:
                load(gen)
            s.codegen, s.codegen_target = folder, target
            s.codegen_built = built

        s.run("codegen", work)
        return {"started": "codegen", "target": target}


def _make_quantizer(kind, source, name, label, target, config, input_shape, spec):
    """A Quantizer for a shipped network, a netquant .safetensors or an ONNX model, with the
    input spec (if any) built for the network's input shape."""
    from ..models.pretrained import load_model_file, load_pretrained
    from ..quantizer import Quantizer

    if kind == ".onnx":
        from ..ir.onnx_import import OnnxImportError, import_onnx

        try:
            graph = import_onnx(source, name=name or None, input_shape=input_shape)
        except OnnxImportError as e:
            raise HttpError(400, f"{label}: {e}")
        extra = {"input_spec": make_input_spec(spec, graph.input.shape)} if spec is not None else {}
        return Quantizer(graph=graph, target=target, config=config, name=name or None, **extra)
    # a card that does not fit the architecture (an extra or missing field) is bad input too
    if kind == ".safetensors":
        try:
            net = load_model_file(source)
        except (ValueError, KeyError, TypeError) as e:
            what = "" if isinstance(e, ValueError) else f"its model card does not fit the network ({type(e).__name__}) "
            raise HttpError(400, f"{label}: {what}{e}")
    else:
        try:
            net = load_pretrained(source)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise HttpError(400, f"{label}: {e}")
    q = Quantizer(net, target=target, config=config, name=net.card["name"])
    if spec is None:
        return q
    # the spec needs the captured input shape; capture again with it (a few hundred ms)
    return Quantizer(net, target=target, config=config, name=net.card["name"],
                     input_spec=make_input_spec(spec, q.graph.input.shape))


def _saved_results(path: Path) -> Optional[dict]:
    """The validation results an exported quantizer file carries (``RESULTS``), if any."""
    with zipfile.ZipFile(path) as z:
        if RESULTS not in z.namelist():
            return None
        try:
            saved = json.loads(z.read(RESULTS))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HttpError(400, f"quantizer file: its {RESULTS} is not JSON ({e})")
    if not isinstance(saved, dict) or not isinstance(saved.get("metrics"), dict):
        raise HttpError(400, f"quantizer file: its {RESULTS} is not a validation result")
    return saved


def _input_shape(s) -> tuple:
    return tuple(s.quantizer.graph.input.shape)


def _outputs(graph) -> int:
    return int(np.prod(graph.node(graph.output).shape))


def _named(load, name: str, hide: tuple = ()):
    """Run a data loader; its ValueError (DataError) becomes a 400 naming the data set, with
    the server's file name ``hide[0]`` shown as the uploaded one, ``hide[1]``."""
    try:
        return load()
    except HttpError:
        raise
    except (ValueError, KeyError, OSError) as e:
        message = str(e).replace(*hide) if hide else str(e)
        raise HttpError(400, f"data set {name}: {message}")


def _status(e: Exception) -> int:
    """The HTTP status of an exception a request raised: the request's own refusals (HttpError),
    a busy session (409), a full server (429), an unknown session or layer (404), any other
    error the user can fix (a NetquantError, or an OSError naming a path: 400); anything else
    is a bug in netquant (500)."""
    if isinstance(e, HttpError):
        return e.status
    if isinstance(e, Busy):
        return 409
    if isinstance(e, Full):
        return 429
    if isinstance(e, NotFoundError):
        return 404
    if isinstance(e, (NetquantError, OSError)):
        return 400
    return 500


def make_handler(app: App, allowed_hosts: frozenset = frozenset()):
    """The request handler class. ``allowed_hosts``: the Host header values (lower case, with
    the port) this server answers; empty: any (a test's bare handler)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "netquant"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: through logging, not stderr
            log.debug("%s %s", self.address_string(), fmt % args)

        # --- plumbing -----------------------------------------------------------------------
        def _send(self, status: int, body: bytes, ctype: str, extra: Optional[dict] = None, csp: str = CSP):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", csp)
            if self.close_connection:
                self.send_header("Connection", "close")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj) -> None:
            self._send(status, json.dumps(obj, allow_nan=False).encode(), "application/json")

        def _authorised(self, query: dict) -> bool:
            given = self.headers.get("X-Token") or (query.get("token") or [""])[0]
            return hmac.compare_digest(given.encode(), app.token.encode())

        def _host_ok(self) -> bool:
            """The Host header names this server (DNS rebinding: a page on evil.example whose
            name now resolves to 127.0.0.1 sends Host: evil.example:PORT)."""
            return not allowed_hosts or (self.headers.get("Host") or "").strip().lower() in allowed_hosts

        def _body(self, limit: int) -> bytes:
            """The request body, its size decided from Content-Length before a byte is read:
            missing (411), not a number or negative (400) and over ``limit`` (413) are refused."""
            given = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                raise HttpError(411, "send the body with a Content-Length, not chunked")
            if given is None:
                if self.command == "POST":
                    self.close_connection = True  # whatever follows is not a request we can read
                    raise HttpError(411, "a POST needs a Content-Length header")
                return b""
            try:
                n = int(given.strip())
            except ValueError:
                n = -1
            if n < 0 or not given.strip().isdigit():
                self.close_connection = True
                raise HttpError(400, f"Content-Length {given!r}: expected a byte count (0 or more)")
            if n > limit:
                if n <= 8 * limit and n <= 64 * 1024 * 1024:
                    # nothing is kept: read and drop it, so the client sees the answer, not a reset
                    while n > 0:
                        chunk = self.rfile.read(min(n, 1 << 20))
                        if not chunk:
                            break
                        n -= len(chunk)
                self.close_connection = True
                raise HttpError(413, f"upload of {given} bytes is over the limit of {limit} bytes")
            data = self.rfile.read(n) if n else b""
            if len(data) != n:
                self.close_connection = True
                raise HttpError(400, f"the body ended after {len(data)} of the {n} bytes Content-Length announced")
            return data

        def _json_body(self) -> dict:
            raw = self._body(MAX_JSON)
            if not raw:
                return {}
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise HttpError(400, f"request body is not JSON ({e})")
            if not isinstance(body, dict):
                raise HttpError(400, "request body must be a JSON object")
            return body

        def _is_upload(self) -> bool:
            return self.headers.get("Content-Type", "").startswith("application/octet-stream")

        def _query(self) -> dict:
            """An upload's options: the query string's fields but the token."""
            return {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items() if k != "token"}

        def _dispatch(self, method: str):
            url = urlparse(self.path)
            query = parse_qs(url.query)
            try:
                if not self._host_ok():
                    self.close_connection = True
                    raise HttpError(421, f"Host {self.headers.get('Host')!r} is not this server; "
                                         f"use {sorted(allowed_hosts)[0] if allowed_hosts else 'its address'}")
                if method == "GET" and url.path == "/favicon.ico":  # browsers ask without the token
                    return self._send(204, b"", "image/x-icon")
                if not self._authorised(query):
                    raise HttpError(401, "missing or wrong access token")
                self._route(method, url.path)
            except Exception as e:
                status = _status(e)
                if status == 500:   # a bug or an unforeseen input: a JSON answer, never a dropped connection
                    eid = uuid.uuid4().hex[:8]
                    log.exception("error %s: %s %s failed", eid, method, url.path)
                    self._error(500, f"internal error {eid} (the server log has its traceback): {type(e).__name__}: {e}")
                else:
                    log.warning("%s %s: %d %s: %s", method, url.path, status, type(e).__name__, e)
                    self._error(status, str(e))

        def _error(self, status: int, message: str) -> None:
            # the server's temporary folder is nobody's business: name it as the session's files
            message = message.replace(str(app.registry.root), "<session files>")
            try:
                self._json(status, {"error": message})
                if self.close_connection and self.command == "POST":
                    self._linger()
            except OSError:  # the client went away
                self.close_connection = True

        def _linger(self, seconds: float = 2.0, most: int = 64 * 1024 * 1024) -> None:
            """After refusing a body unread: stop sending, then read and drop what the client
            still sends for a moment, so closing does not reset the connection before the client
            has read the answer (a lingering close, as Apache does)."""
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(seconds)
            try:
                while most > 0:
                    chunk = self.connection.recv(1 << 20)
                    if not chunk:
                        break
                    most -= len(chunk)
            except OSError:  # the timeout: enough
                pass

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        def do_DELETE(self):
            self._dispatch("DELETE")

        # --- routes ---------------------------------------------------------------------------
        def _route(self, method: str, path: str):
            if method == "GET" and path in STATIC:
                name, ctype = STATIC[path]
                body = resources.files("netquant.app").joinpath("static", name).read_bytes()
                if name == "index.html":  # the page's assets carry the token as well
                    tok = app.token.encode()
                    body = body.replace(b'/static/app.css"', b'/static/app.css?token=' + tok + b'"')
                    body = body.replace(b'/static/app.js"', b'/static/app.js?token=' + tok + b'"')
                return self._send(200, body, ctype)
            parts = [p for p in path.split("/") if p]
            if parts[:1] != ["api"]:
                raise HttpError(404, f"no page {path}")
            parts = parts[1:]
            if method == "GET" and parts == ["networks"]:
                return self._json(200, app.networks())
            if method == "POST" and parts == ["sessions"]:
                if self._is_upload():
                    return self._json(200, app.new_session(self._query(), self._body(app.max_upload)))
                return self._json(200, app.new_session(self._json_body()))
            if method == "POST" and parts == ["import"]:
                return self._json(200, app.import_quantizer(self._body(app.max_upload)))
            if len(parts) < 2 or parts[0] != "sessions" or not re.fullmatch(r"[0-9a-f]{12}", parts[1]):
                raise HttpError(404, f"no API route {method} {path}")
            sid, rest = parts[1], parts[2:]
            s = app.registry.get(sid)
            if method == "GET" and rest == []:
                return self._json(200, app.session_json(s))
            if method == "GET" and rest == ["data"]:
                return self._json(200, {"datasets": app.datasets(s)})
            if method == "POST" and rest == ["data"]:
                if self._is_upload():
                    return self._json(200, app.add_data(sid, self._query(), self._body(app.max_upload)))
                return self._json(200, app.add_data(sid, self._json_body()))
            if method == "GET" and rest == ["job"]:
                job = s.job.to_json()  # a failed job's message may name the server's files
                job["error"] = job["error"].replace(str(app.registry.root), "<session files>")
                return self._json(200, job)
            if method == "GET" and rest == ["calibration"]:
                if s.quantizer.ranges is None:
                    raise HttpError(409, "not calibrated yet")
                return self._json(200, calibration_json(s.quantizer))
            if method == "GET" and rest == ["validation"]:
                if s.validation is None:
                    raise HttpError(409, "not validated yet (or the layer choices changed since)")
                return self._json(200, s.validation)
            if method == "POST" and rest == ["calibrate"]:
                if self._is_upload():
                    return self._json(200, app.calibrate(sid, {}, self._body(app.max_upload)))
                return self._json(200, app.calibrate(sid, self._json_body(), None))
            if method == "POST" and rest == ["config"]:
                return self._json(200, app.set_config(sid, self._json_body()))
            if method == "POST" and rest == ["layers"]:
                return self._json(200, app.set_layer(sid, self._json_body()))
            if method == "POST" and rest == ["validate"]:
                return self._json(200, app.validate(sid, self._json_body()))
            if method == "POST" and rest == ["sensitivity"]:
                return self._json(200, app.sensitivity(sid, self._json_body()))
            if method == "GET" and rest == ["sensitivity"]:
                if s.sensitivity is None:
                    raise HttpError(409, "no sensitivity table yet (or the network changed since)")
                return self._json(200, s.sensitivity)
            if method == "POST" and rest == ["auto_precision"]:
                return self._json(200, app.auto_precision(sid, self._json_body()))
            if method == "GET" and rest == ["auto_precision"]:
                if s.search is None:
                    raise HttpError(409, "no precision search yet")
                return self._json(200, s.search)
            if method == "POST" and rest == ["codegen"]:
                return self._json(200, app.codegen(sid, self._json_body()))
            if method == "GET" and rest == ["export", "quantizer"]:
                return self._send(200, app.export_quantizer(s), "application/octet-stream",
                                  {"Content-Disposition": 'attachment; filename="quantizer.nq"'})
            if method == "GET" and rest == ["export", "onnx"]:
                from ..export.onnx import export_quantized_onnx

                path = s.folder / "export.onnx"
                export_quantized_onnx(s.quantizer.quantize(), path)
                return self._send(200, path.read_bytes(), "application/octet-stream",
                                  {"Content-Disposition": 'attachment; filename="network_int8.onnx"'})
            if method == "GET" and rest == ["export", "code"]:
                if s.codegen is None:
                    raise HttpError(409, "generate code first")
                name = f"netquant-{s.codegen_target}.zip"
                return self._send(200, zip_folder(s.codegen), "application/zip",
                                  {"Content-Disposition": f'attachment; filename="{name}"'})
            if method == "GET" and rest == ["export", "report"]:
                if s.codegen is None:
                    raise HttpError(409, "generate code first")
                return self._send(200, (s.codegen / "report.html").read_bytes(), "text/html; charset=utf-8",
                                  csp=REPORT_CSP)
            raise HttpError(404, f"no API route {method} {path}")

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = BACKLOG   # socketserver's default of 5 resets a burst of requests
    daemon_threads = True


def allowed_hosts(host: str, port: int) -> frozenset:
    """The Host header values a server bound to ``host``:``port`` answers: its own address and,
    for a loopback bind, localhost/127.0.0.1/[::1]; for a wildcard bind (0.0.0.0, ::) this
    machine's names and any IP address (an address, unlike a name, cannot be rebound)."""
    names = {host}
    if host in ("127.0.0.1", "localhost", "::1"):
        names |= {"127.0.0.1", "localhost", "::1"}
    if host in ("0.0.0.0", "::", ""):
        names |= {"127.0.0.1", "localhost", "::1", socket.gethostname(), socket.getfqdn()}
        try:
            names |= {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
    out = set()
    for n in names:
        n = n.lower()
        try:
            bracketed = f"[{n}]" if ipaddress.ip_address(n).version == 6 else n
        except ValueError:
            bracketed = n
        out |= {f"{bracketed}:{port}"} | ({bracketed} if port == 80 else set())
    return frozenset(out)


class Server:
    """A running app: ``url`` carries the token; ``close()`` stops it and removes its files.
    ``idle_timeout``: seconds after which an unused session expires with its files."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, data=None, token: Optional[str] = None,
                 max_upload: int = MAX_UPLOAD, max_expanded: int = MAX_EXPANDED,
                 idle_timeout: float = IDLE_TIMEOUT, max_sessions: int = MAX_SESSIONS, workdir=None):
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("binding the app to %s: anyone who can reach this address and has the token can use it", host)
        self.app = App(data, token, max_upload, max_expanded, idle_timeout, max_sessions, workdir)
        self.httpd = _HTTPServer((host, port), make_handler(self.app))
        self.host, self.port = host, self.httpd.server_address[1]
        self.httpd.RequestHandlerClass = make_handler(self.app, allowed_hosts(host, self.port))
        self.thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._expire, name="netquant-expiry", daemon=True)
        self._reaper.start()
        self._closed = False
        log.info("netquant app: session files under %s", self.app.registry.root)

    def _expire(self) -> None:
        # check a few times per idle period, at least every minute
        every = min(60.0, max(0.05, self.app.registry.idle_timeout / 4))
        while not self._stop.wait(every):
            self.app.registry.expire()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/?token={self.app.token}"

    def start(self) -> "Server":
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="netquant-app", daemon=True)
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self.thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()
        self.app.registry.close()


def serve(host: str = "127.0.0.1", port: int = 0, open_browser: bool = True, data=None,
          idle_timeout: Optional[float] = None) -> None:
    """Run the app until interrupted (the CLI's ``netquant app``); SIGINT and SIGTERM stop it
    and delete its temporary files. ``idle_timeout``: seconds before an unused session expires
    (default: $NETQUANT_APP_IDLE_TIMEOUT, else an hour)."""
    if idle_timeout is None:
        text = os.environ.get("NETQUANT_APP_IDLE_TIMEOUT", "")
        try:
            idle_timeout = float(text) if text else IDLE_TIMEOUT
        except ValueError:
            raise ArgumentError(f"NETQUANT_APP_IDLE_TIMEOUT={text!r}: expected seconds, a positive number") from None
    server = Server(host, port, data, idle_timeout=idle_timeout)

    def stop(signum, frame):
        log.info("netquant app: %s, stopping", signal.Signals(signum).name)
        # shutdown() waits for serve_forever, which runs on this thread: ask from another one
        threading.Thread(target=server.httpd.shutdown, daemon=True).start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    print(f"netquant app: {server.url}", flush=True)
    if open_browser:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
