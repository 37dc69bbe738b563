"""The app's server, without a browser: token on every request, uploads checked and confined,
no path traversal, several sessions at once, the whole API flow on real CIFAR-10."""
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from netquant.app.server import Server


@pytest.fixture(scope="module")
def server(cifar_path):
    s = Server(data=str(cifar_path), max_upload=2 * 1024 * 1024).start()
    yield s
    s.close()


def call(server, method, path, body=None, token=True, raw=None, ctype=None):
    url = f"http://127.0.0.1:{server.port}{path}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("X-Token", server.app.token)
    if data is not None:
        req.add_header("Content-Type", ctype or ("application/octet-stream" if raw is not None else "application/json"))
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            payload = r.read()
            return r.status, (json.loads(payload) if r.headers.get("Content-Type") == "application/json" else payload)
    except urllib.error.HTTPError as e:
        payload = e.read()
        return e.code, (json.loads(payload) if payload.startswith(b"{") else payload)


def wait(server, sid):
    import time

    for _ in range(1200):
        code, job = call(server, "GET", f"/api/sessions/{sid}/job")
        if job["state"] in ("done", "error"):
            return job
        time.sleep(0.1)
    raise AssertionError("job did not finish")


def test_binds_to_localhost_only(server):
    assert server.httpd.server_address[0] == "127.0.0.1"
    assert server.url.startswith("http://127.0.0.1:") and f"token={server.app.token}" in server.url


def test_token_is_required_everywhere(server):
    for path in ("/", "/static/app.js", "/api/networks"):
        code, body = call(server, "GET", path, token=False)
        assert code == 401, path
    code, _ = call(server, "GET", f"/api/networks?token=wrong{server.app.token}", token=False)
    assert code == 401
    code, page = call(server, "GET", f"/?token={server.app.token}", token=False)
    assert code == 200 and f"/static/app.js?token={server.app.token}".encode() in page
    code, body = call(server, "POST", "/api/sessions", {"network": "cifarnet-20-16"}, token=False)
    assert code == 401


def test_no_path_traversal(server):
    for path in ("/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd", "/../pyproject.toml",
                 "/api/sessions/../../etc/passwd/job", "/static/app.js/../../server.py"):
        code, body = call(server, "GET", path)
        assert code == 404, path
        assert b"root:" not in (body if isinstance(body, bytes) else json.dumps(body).encode())


def test_bad_and_oversized_uploads(server):
    _, s = call(server, "POST", "/api/sessions", {"network": "cifarnet-20-16"})
    sid = s["id"]
    code, body = call(server, "POST", f"/api/sessions/{sid}/calibrate", raw=b"this is not numpy")
    assert code == 400 and "not a .npy array" in body["error"]
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 32, 32, 3), np.uint8))
    code, body = call(server, "POST", f"/api/sessions/{sid}/calibrate", raw=buf.getvalue())
    assert code == 400 and "expected images of shape (N, 3, 32, 32)" in body["error"]
    buf = io.BytesIO()
    np.save(buf, np.zeros((1000, 3, 32, 32), np.uint8))  # 3 MB: over this server's 2 MB limit
    code, body = call(server, "POST", f"/api/sessions/{sid}/calibrate", raw=buf.getvalue())
    assert code == 413 and "over the limit" in body["error"]
    code, body = call(server, "POST", "/api/import", raw=b"PK\x03\x04 broken zip")
    assert code == 400 and "not a quantizer file" in body["error"]
    # uploads land in the session's own folder, under the server's names only
    folder = server.app.registry.get(sid).folder
    assert {p.name for p in folder.iterdir()} <= {"calibration-upload.npy"}
    assert folder.parent == server.app.registry.root
    code, body = call(server, "POST", f"/api/sessions/{sid}/validate", {"metrics": ["os:system"]})
    assert code == 400
    code, body = call(server, "POST", f"/api/sessions/{sid}/validate", {"metrics": ["__import__('os')"]})
    assert code == 400 and "importable module:function" in body["error"]


def test_two_sessions_at_once_and_the_whole_flow(server, cifar, tmp_path):
    _, a = call(server, "POST", "/api/sessions", {"network": "cifarnet-20-16", "target": "gpu"})
    _, b = call(server, "POST", "/api/sessions", {"network": "cifarnet-20-16", "target": "fpga"})
    buf = io.BytesIO()
    np.save(buf, cifar.train.images[:40])
    results = {}

    def calibrate(sid, **kw):
        results[sid] = call(server, "POST", f"/api/sessions/{sid}/calibrate", **kw)

    ta = threading.Thread(target=calibrate, args=(a["id"],), kwargs={"body": {"count": 60, "seed": 1}})
    tb = threading.Thread(target=calibrate, args=(b["id"],), kwargs={"raw": buf.getvalue()})
    ta.start(); tb.start(); ta.join(); tb.join()
    assert results[a["id"]][0] == 200 and results[b["id"]][0] == 200
    code, busy = call(server, "POST", f"/api/sessions/{a['id']}/calibrate", {"count": 10})
    assert code in (200, 409)  # 409 while the first calibration still runs
    assert wait(server, a["id"])["state"] == "done" and wait(server, b["id"])["state"] == "done"
    _, ca = call(server, "GET", f"/api/sessions/{a['id']}/calibration")
    _, cb = call(server, "GET", f"/api/sessions/{b['id']}/calibration")
    assert ca["images"] in (60, 10) and cb["images"] == 40 and "uploaded" not in ca["source"]
    assert len(ca["rows"]) == 80 and ca["rows"][2]["histogram"]["counts"]
    sa = {r["Optimized Layer Name"]: r["Scale"] for r in ca["rows"]}
    sb = {r["Optimized Layer Name"]: r["Scale"] for r in cb["rows"]}
    assert sa["convInp_reluInp"] != sb["convInp_reluInp"]  # float scales vs powers of two
    # untick a layer, validate, read the results
    code, _ = call(server, "POST", f"/api/sessions/{a['id']}/layers", {"layer": "S3U3_conv2", "quantize": False})
    assert code == 200
    code, body = call(server, "POST", f"/api/sessions/{a['id']}/layers", {"layer": "softmax", "quantize": True})
    assert code == 200  # asking to quantize a float-only layer changes nothing
    code, body = call(server, "POST", f"/api/sessions/{a['id']}/layers", {"layer": "nope", "quantize": False})
    assert code == 400 and "no layer named 'nope'" in body["error"]
    code, _ = call(server, "POST", f"/api/sessions/{a['id']}/validate",
                   {"count": 40, "metrics": ["top1", "netquant.metrics:top5"]})
    assert code == 200 and wait(server, a["id"])["state"] == "done"
    _, v = call(server, "GET", f"/api/sessions/{a['id']}/validation")
    assert v["num_samples"] == 40 and set(v["metrics"]) == {"top1", "top5"}
    assert v["metrics"]["top1"][0]["NetworkImplementation"] == "Floating-Point"
    assert v["memory"]["float"] == 1_089_896 and v["layer_errors"]
    # export, and import the quantizer into a new session
    code, blob = call(server, "GET", f"/api/sessions/{a['id']}/export/quantizer")
    assert code == 200 and blob[:2] == b"PK"
    code, imported = call(server, "POST", "/api/import", raw=blob)
    assert code == 200 and imported["calibrated"]
    _, ci = call(server, "GET", f"/api/sessions/{imported['id']}/calibration")
    _, ca2 = call(server, "GET", f"/api/sessions/{a['id']}/calibration")
    assert {r["Optimized Layer Name"]: r["Scale"] for r in ci["rows"]} == \
        {r["Optimized Layer Name"]: r["Scale"] for r in ca2["rows"]}
    assert ca2["rows"] != ca["rows"]  # S3U3_conv2 is float now: no scale
    assert not next(l for l in ci["layers"] if l["name"] == "S3U3_conv2")["quantized"]
    code, onnx_blob = call(server, "GET", f"/api/sessions/{a['id']}/export/onnx")
    assert code == 200 and len(onnx_blob) > 100_000
    # generate and build the C code, download it with its report
    code, _ = call(server, "POST", f"/api/sessions/{a['id']}/codegen")
    assert code == 200
    code, _ = call(server, "GET", f"/api/sessions/{a['id']}/export/code")
    assert code in (200, 409)  # 409 while it is still generating
    job = wait(server, a["id"])
    assert job["state"] == "error" and "kept in float" in job["error"]  # S3U3_conv2 is float: C needs all convs
    call(server, "POST", f"/api/sessions/{a['id']}/layers", {"layer": "S3U3_conv2", "quantize": True})
    call(server, "POST", f"/api/sessions/{a['id']}/codegen")
    assert wait(server, a["id"])["state"] == "done"
    code, blob = call(server, "GET", f"/api/sessions/{a['id']}/export/code")
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(blob)).namelist()
    assert {"net.c", "net.h", "netquant_rt.h", "report.html", "Makefile", "main.c"} <= set(names)
    code, report = call(server, "GET", f"/api/sessions/{a['id']}/export/report")
    assert code == 200 and b"Code generation report" in report


def test_model_file_by_path_and_upload(server, tmp_path):
    from netquant.models import resnet
    from netquant.models.pretrained import save_pretrained

    save_pretrained(resnet(8, 3).eval(), tmp_path, {"note": "untrained, for the test"})
    path = tmp_path / "cifarnet-8-8.safetensors"
    code, s = call(server, "POST", "/api/sessions", {"model_path": str(path), "target": "cpu"})
    assert code == 200 and s["network"] == "cifarnet-8-8"
    code, s = call(server, "POST", "/api/sessions?target=fpga", raw=path.read_bytes())
    assert code == 200 and s["network"] == "cifarnet-8-8" and s["config"]["scale"] == "pow2"
    code, body = call(server, "POST", "/api/sessions?target=gpu", raw=b"garbage")
    assert code == 400 and "not a safetensors file" in body["error"]
    code, body = call(server, "POST", "/api/sessions", {"model_path": str(tmp_path / "none.safetensors")})
    assert code == 400 and "no such model file" in body["error"]
