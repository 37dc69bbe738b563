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
    POST /api/sessions/ID/layers             {layer, quantize}
    POST /api/sessions/ID/validate           {data, count, seed, metrics}
    POST /api/sessions/ID/codegen
    GET  /api/sessions/ID/job | calibration | validation | export/{quantizer,onnx,code,report}

Security: it binds to 127.0.0.1 unless told otherwise (with a warning); every request, pages
and assets included, must carry the random access token printed with the URL (query ``token``
or header ``X-Token``); uploads are size-limited (archives also by what they expand to), parsed
without pickle and written only into the session's temporary folder under names the server
makes up; uploaded ONNX models are read from memory, so they cannot reach other files through
external data; static files come from a fixed list (no paths from the request reach the file
system); custom metrics are importable ``module:function`` names only. Every failure, expected
or not, is answered with a JSON ``{"error": message}``.
"""
from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import re
import secrets
import sys
import threading
import webbrowser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, urlparse

import numpy as np

from .inputs import (DATA_SUFFIXES, MODEL_SUFFIXES, HttpError, check_archive, data_kind, load_npy,
                     make_input_spec, model_kind, parse_class_names, parse_count, safe_name, shape_arg,
                     spec_fields, to_int)
from .sessions import (Busy, DataSet, PredictionRecorder, Registry, calibration_json, per_class_json,
                       validation_json, zip_folder)

log = logging.getLogger(__name__)

MAX_UPLOAD = 256 * 1024 * 1024     # a model or data set upload (ResNet-50 in ONNX is 100 MB)
MAX_EXPANDED = 1024 * 1024 * 1024  # what an uploaded zip/npz may expand to
MAX_JSON = 1024 * 1024
TARGETS = ("gpu", "cpu", "fpga", "matlab")
CIFAR, CIFAR_SHAPE = "cifar10", (3, 32, 32)
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/app.css": ("app.css", "text/css; charset=utf-8")}
METRIC_NAME = re.compile(r"^(top1|top5|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")


class App:
    """State shared by the request handlers: token, sessions, the default data set (CIFAR-10)."""

    def __init__(self, data_spec=None, token: Optional[str] = None, max_upload: int = MAX_UPLOAD,
                 max_expanded: int = MAX_EXPANDED):
        self.token = token or secrets.token_urlsafe(24)
        self.registry = Registry()
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
                "range_methods": ["minmax", "percentile", "entropy", "mse"], "data": self.data.test.source,
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
        s = self.registry.create(None, "", None)  # its folder receives the upload
        try:
            if model_blob is not None:
                filename = str(body.get("filename") or "")
                kind = model_kind(filename, model_blob)
                path = s.folder / f"uploaded-model{kind}"
                path.write_bytes(model_blob)
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
            self.registry.discard(s.id)
            raise
        s.network = s.quantizer.name
        return self.session_json(s)

    def import_quantizer(self, blob: bytes) -> dict:
        from ..quantizer import Quantizer

        s = self.registry.create(None, "", None)
        path = s.folder / "imported.nq"
        path.write_bytes(blob)
        try:
            s.quantizer = Quantizer.load(path)
        except (ValueError, KeyError) as e:
            self.registry.discard(s.id)
            raise HttpError(400, f"not a quantizer file: {e}")
        except BaseException:
            self.registry.discard(s.id)
            raise
        s.network = s.quantizer.name
        return self.session_json(s)

    def session_json(self, s) -> dict:
        q = s.quantizer
        spec = getattr(q, "input_spec", None)
        return {"id": s.id, "network": s.network, "target": getattr(q, "target", ""),
                "calibrated": q.ranges is not None, "config": q.config.to_dict(),
                "input_shape": list(q.graph.input.shape), "outputs": _outputs(q.graph),
                "input_spec": spec.to_json() if spec is not None else None, "datasets": self.datasets(s)}

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
            n = len(s.datasets) + 1
            did = f"data{n}"
            s.datasets[did] = None  # reserved
        try:
            if blob is not None:
                filename = str(body.get("filename") or "")
                kind = data_kind(filename, blob)
                path = s.folder / f"data-{n}{kind}"
                path.write_bytes(blob)
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
            s.validation = None

        s.run("calibrate", work)
        return {"started": "calibrate", "source": source}

    def set_layer(self, sid: str, body: dict) -> dict:
        s = self.registry.get(sid)
        try:
            s.quantizer.set_quantize(str(body["layer"]), bool(body["quantize"]))
        except KeyError as e:
            raise HttpError(400, str(e).strip("'\""))
        except ValueError as e:
            raise HttpError(400, str(e))
        return {"float_layers": sorted(s.quantizer.user_float)}

    def validate(self, sid: str, body: dict) -> dict:
        from ..data import validation_set
        from ..metrics import resolve_metric

        s = self.registry.get(sid)
        metrics = [str(m) for m in body.get("metrics", ["top1", "top5"])]
        for m in metrics:
            if not METRIC_NAME.match(m):
                raise HttpError(400, f"metric {m!r}: use top1, top5 or an importable module:function name")
            if ":" in m and m.split(".")[0].split(":")[0] in sys.stdlib_module_names | {"builtins"}:
                raise HttpError(400, f"metric {m!r}: a metric must come from your own module, not the standard library")
            try:
                resolve_metric(m)
            except ValueError as e:
                raise HttpError(400, str(e))
        data = self.dataset(s, body.get("data"))
        images = validation_set(data, parse_count(body.get("count", 50)), to_int(body.get("seed", 0), "seed"))
        if s.quantizer.ranges is None:
            raise HttpError(409, "calibrate first: the quantizer has no calibration statistics")

        def work(progress):
            recorder = PredictionRecorder()
            result = s.quantizer.validate(images, metrics=metrics + [recorder], progress=progress)
            per_class = per_class_json(images.labels, *recorder.runs, data) if len(recorder.runs) == 2 else []
            s.validation = validation_json(result, s.quantizer, per_class, data)

        s.run("validate", work)
        return {"started": "validate", "source": images.source}

    def codegen(self, sid: str) -> dict:
        from ..codegen import generate, load

        s = self.registry.get(sid)
        folder = s.folder / "codegen"

        def work(progress):
            gen = generate(s.quantizer.quantize(), folder, name="net", progress=progress)
            load(gen)
            s.codegen = folder

        s.run("codegen", work)
        return {"started": "codegen"}


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
    if kind == ".safetensors":
        try:
            net = load_model_file(source)
        except (ValueError, KeyError) as e:
            raise HttpError(400, f"{label}: {e}")
    else:
        try:
            net = load_pretrained(source)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise HttpError(400, f"{label}: {e}")
    q = Quantizer(net, target=target, config=config, name=net.card["name"])
    if spec is None:
        return q
    # the spec needs the captured input shape; capture again with it (a few hundred ms)
    return Quantizer(net, target=target, config=config, name=net.card["name"],
                     input_spec=make_input_spec(spec, q.graph.input.shape))


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


def make_handler(app: App):
    class Handler(BaseHTTPRequestHandler):
        server_version = "netquant"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: through logging, not stderr
            log.debug("%s %s", self.address_string(), fmt % args)

        # --- plumbing -----------------------------------------------------------------------
        def _send(self, status: int, body: bytes, ctype: str, extra: Optional[dict] = None):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                                        "style-src 'self'; script-src 'self'")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj) -> None:
            self._send(status, json.dumps(obj, allow_nan=False).encode(), "application/json")

        def _authorised(self, query: dict) -> bool:
            given = self.headers.get("X-Token") or (query.get("token") or [""])[0]
            return hmac.compare_digest(given.encode(), app.token.encode())

        def _body(self, limit: int) -> bytes:
            try:
                n = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                raise HttpError(400, "bad Content-Length")
            if n > limit:
                if n <= 8 * limit:  # read and discard it, so the client sees the answer, not a reset
                    while n > 0:
                        n -= len(self.rfile.read(min(n, 1 << 20)) or b"x" * n)
                else:
                    self.close_connection = True
                raise HttpError(413, f"upload of {self.headers.get('Content-Length')} bytes is over the limit of "
                                     f"{limit} bytes")
            return self.rfile.read(n) if n else b""

        def _json_body(self) -> dict:
            raw = self._body(MAX_JSON)
            if not raw:
                return {}
            try:
                body = json.loads(raw)
            except json.JSONDecodeError as e:
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
                if not self._authorised(query):
                    raise HttpError(401, "missing or wrong access token")
                self._route(method, url.path)
            except HttpError as e:
                self._json(e.status, {"error": str(e)})
            except Busy as e:
                self._json(409, {"error": str(e)})
            except KeyError as e:
                self._json(404, {"error": str(e).strip("'\"")})
            except (ValueError, RuntimeError, OSError) as e:
                self._json(400, {"error": str(e)})
            except Exception as e:  # a bug or an unforeseen input: still a JSON answer, never a dropped connection
                log.exception("%s %s failed", method, url.path)
                self._json(500, {"error": f"{type(e).__name__}: {e}"})

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

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
                raise HttpError(404, f"no API route {path}")
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
                return self._json(200, s.job.to_json())
            if method == "GET" and rest == ["calibration"]:
                if s.quantizer.ranges is None:
                    raise HttpError(409, "not calibrated yet")
                return self._json(200, calibration_json(s.quantizer))
            if method == "GET" and rest == ["validation"]:
                if s.validation is None:
                    raise HttpError(409, "not validated yet")
                return self._json(200, s.validation)
            if method == "POST" and rest == ["calibrate"]:
                if self._is_upload():
                    return self._json(200, app.calibrate(sid, {}, self._body(app.max_upload)))
                return self._json(200, app.calibrate(sid, self._json_body(), None))
            if method == "POST" and rest == ["layers"]:
                return self._json(200, app.set_layer(sid, self._json_body()))
            if method == "POST" and rest == ["validate"]:
                return self._json(200, app.validate(sid, self._json_body()))
            if method == "POST" and rest == ["codegen"]:
                return self._json(200, app.codegen(sid))
            if method == "GET" and rest == ["export", "quantizer"]:
                path = s.folder / "export.nq"
                s.quantizer.save(path)
                return self._send(200, path.read_bytes(), "application/octet-stream",
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
                return self._send(200, zip_folder(s.codegen), "application/zip",
                                  {"Content-Disposition": 'attachment; filename="netquant-c.zip"'})
            if method == "GET" and rest == ["export", "report"]:
                if s.codegen is None:
                    raise HttpError(409, "generate code first")
                return self._send(200, (s.codegen / "report.html").read_bytes(), "text/html; charset=utf-8")
            raise HttpError(404, f"no API route {path}")

    return Handler


class Server:
    """A running app: ``url`` carries the token; ``close()`` stops it and removes its files."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, data=None, token: Optional[str] = None,
                 max_upload: int = MAX_UPLOAD, max_expanded: int = MAX_EXPANDED):
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("binding the app to %s: anyone who can reach this address and has the token can use it", host)
        self.app = App(data, token, max_upload, max_expanded)
        self.httpd = ThreadingHTTPServer((host, port), make_handler(self.app))
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self.thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/?token={self.app.token}"

    def start(self) -> "Server":
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="netquant-app", daemon=True)
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.app.registry.close()


def serve(host: str = "127.0.0.1", port: int = 0, open_browser: bool = True, data=None) -> None:
    """Run the app until interrupted (the CLI's ``netquant app``)."""
    server = Server(host, port, data)
    print(f"netquant app: {server.url}", flush=True)
    if open_browser:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
