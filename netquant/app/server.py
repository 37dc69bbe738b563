"""The Deep Network Quantizer app: a local web server over the netquant API.

    netquant app [--port N] [--no-browser] [--host 127.0.0.1]

Security: it binds to 127.0.0.1 unless told otherwise (with a warning); every request, pages
and assets included, must carry the random access token printed with the URL (query ``token``
or header ``X-Token``); uploads are size-limited and written only into the session's temporary
folder under names the server makes up; static files come from a fixed list (no paths from the
request reach the file system); custom metrics are importable ``module:function`` names only.
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import sys
import threading
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, urlparse

import numpy as np

from .sessions import Busy, Registry, calibration_json, validation_json, zip_folder

log = logging.getLogger(__name__)

MAX_UPLOAD = 64 * 1024 * 1024
MAX_JSON = 1024 * 1024
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/app.css": ("app.css", "text/css; charset=utf-8")}
METRIC_NAME = re.compile(r"^(top1|top5|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class App:
    """State shared by the request handlers: token, sessions, the dataset."""

    def __init__(self, data_spec=None, token: Optional[str] = None, max_upload: int = MAX_UPLOAD):
        self.token = token or secrets.token_urlsafe(24)
        self.registry = Registry()
        self.data_spec = data_spec
        self.max_upload = max_upload
        self._data = None
        self._data_lock = threading.Lock()

    @property
    def data(self):
        with self._data_lock:
            if self._data is None:
                from ..data import load_cifar10

                self._data = load_cifar10(self.data_spec)
            return self._data

    # --- API ------------------------------------------------------------------------------
    def networks(self) -> dict:
        from ..models.pretrained import list_pretrained

        return {"networks": list_pretrained(), "targets": ["gpu", "cpu", "fpga", "matlab"],
                "range_methods": ["minmax", "percentile", "entropy", "mse"], "data": self.data.test.source}

    def new_session(self, body: dict, model_blob: Optional[bytes] = None) -> dict:
        from dataclasses import replace

        from ..models.pretrained import load_model_file, load_pretrained
        from ..quant.config import target_config
        from ..quantizer import Quantizer

        network = str(body.get("network", "cifarnet-20-16"))
        target = str(body.get("target", "gpu"))
        cfg = target_config(target)
        changes = {k: body[k] for k in ("scale", "weight_granularity", "activation_range") if body.get(k)}
        if body.get("model_path"):  # a model file on this machine (the app is local)
            net = load_model_file(str(body["model_path"]))
            network = net.card["name"]
        elif model_blob is not None:
            s = self.registry.create(None, "", None)
            path = s.folder / "uploaded-model.safetensors"
            path.write_bytes(model_blob)
            try:
                net = load_model_file(path)
            except (ValueError, KeyError) as e:
                raise HttpError(400, f"upload: {e}")
            s.quantizer = Quantizer(net, target=target, config=replace(cfg, **changes))
            s.network = net.card["name"]
            return {"id": s.id, "network": s.network, "target": target, "config": s.quantizer.config.to_dict()}
        else:
            net = load_pretrained(network)
        q = Quantizer(net, target=target, config=replace(cfg, **changes))
        s = self.registry.create(q, network, None)
        return {"id": s.id, "network": network, "target": target, "config": q.config.to_dict()}

    def import_quantizer(self, blob: bytes) -> dict:
        from ..quantizer import Quantizer

        s = self.registry.create(None, "", None)
        path = s.folder / "imported.nq"
        path.write_bytes(blob)
        try:
            s.quantizer = Quantizer.load(path)
        except (ValueError, KeyError) as e:
            raise HttpError(400, f"not a quantizer file: {e}")
        s.network = s.quantizer.name
        return {"id": s.id, "network": s.network, "calibrated": s.quantizer.ranges is not None,
                "config": s.quantizer.config.to_dict()}

    def calibrate(self, sid: str, body: dict, upload: Optional[bytes]) -> dict:
        from ..data import calibration_set

        s = self.registry.get(sid)
        if upload is not None:
            images = _load_images(upload, s.folder)
            source = f"{len(images)} uploaded images"
        else:
            count, seed = _count(body.get("count", 200)), int(body.get("seed", 0))
            images = calibration_set(self.data, count, seed)
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
        images = validation_set(self.data, _count(body.get("count", 50)), int(body.get("seed", 0)))

        def work(progress):
            result = s.quantizer.validate(images, metrics=metrics, progress=progress)
            s.validation = validation_json(result, s.quantizer)

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


def _count(v):
    if v == "all":
        return "all"
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise HttpError(400, f"count must be a positive integer or 'all', got {v!r}")
    if n <= 0:
        raise HttpError(400, f"count must be positive, got {n}")
    return n


def _load_images(blob: bytes, folder: Path) -> np.ndarray:
    """An uploaded .npy array of images (N, 3, 32, 32), uint8 or float in [0, 1]; parsed without
    pickle, stored in the session folder under a fixed name."""
    import io

    path = folder / "calibration-upload.npy"
    path.write_bytes(blob)
    try:
        arr = np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise HttpError(400, f"upload: not a .npy array ({e})")
    if arr.ndim != 4 or arr.shape[1:] != (3, 32, 32) or len(arr) == 0:
        raise HttpError(400, f"upload: expected images of shape (N, 3, 32, 32), got {arr.shape}")
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise HttpError(400, f"upload: expected uint8 or float images, got {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise HttpError(400, "upload: images hold NaN or inf values")
    return arr


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
                if self.headers.get("Content-Type", "").startswith("application/octet-stream"):
                    q = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items() if k != "token"}
                    return self._json(200, app.new_session(q, self._body(app.max_upload)))
                return self._json(200, app.new_session(self._json_body()))
            if method == "POST" and parts == ["import"]:
                return self._json(200, app.import_quantizer(self._body(app.max_upload)))
            if len(parts) < 2 or parts[0] != "sessions" or not re.fullmatch(r"[0-9a-f]{12}", parts[1]):
                raise HttpError(404, f"no API route {path}")
            sid, rest = parts[1], parts[2:]
            s = app.registry.get(sid)
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
                if self.headers.get("Content-Type", "").startswith("application/octet-stream"):
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
                 max_upload: int = MAX_UPLOAD):
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("binding the app to %s: anyone who can reach this address and has the token can use it", host)
        self.app = App(data, token, max_upload)
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
