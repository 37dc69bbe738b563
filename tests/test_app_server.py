"""The app's server, without a browser: token on every request, uploads checked and confined,
no path traversal, several sessions at once, the whole API flow on real CIFAR-10, and the same
flow for a user's own ONNX model with zips of real CIFAR-10 PNGs as its data sets."""
import io
import json
import threading
import urllib.error
import urllib.parse
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
    assert job["state"] == "done", job  # S3U3_conv2 kept in float runs in float in the C code too
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
    before = len(server.app.registry.sessions)
    path = tmp_path / "cifarnet-8-8.safetensors"
    code, s = call(server, "POST", "/api/sessions", {"model_path": str(path), "target": "cpu"})
    assert code == 200 and s["network"] == "cifarnet-8-8"
    code, s = call(server, "POST", "/api/sessions?target=fpga", raw=path.read_bytes())
    assert code == 200 and s["network"] == "cifarnet-8-8" and s["config"]["scale"] == "pow2"
    code, body = call(server, "POST", "/api/sessions?target=gpu&filename=net.safetensors", raw=b"garbage")
    assert code == 400 and "not a safetensors file" in body["error"]
    code, body = call(server, "POST", "/api/sessions?target=gpu&filename=net.pt", raw=path.read_bytes())
    assert code == 400 and "expected a .onnx or .safetensors file" in body["error"]
    code, body = call(server, "POST", "/api/sessions?target=nope", raw=path.read_bytes())
    assert code == 400 and "target 'nope'" in body["error"]
    assert len(server.app.registry.sessions) == before + 2  # failed uploads leave no session behind
    code, body = call(server, "POST", "/api/sessions", {"model_path": str(tmp_path / "none.safetensors")})
    assert code == 400 and "no such model file" in body["error"]


# --- the user's own ONNX model and data sets ------------------------------------------------------

def onnx_model(tmp_path, size: int) -> bytes:
    """tests/zoo.py's torchvision-style ResNet exported to ONNX for (3, size, size) input, as a
    user exports their model."""
    import torch

    from zoo import make

    path = tmp_path / f"resnet_b_{size}.onnx"
    torch.onnx.export(make("resnet_b"), torch.zeros(1, 3, size, size), str(path), dynamo=False,
                      input_names=["image"], output_names=["scores"],
                      dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}})
    return path.read_bytes()


def image_folder_zip(images, labels, names) -> bytes:
    """A zip of an ImageNet-style folder: one sub-folder per class, one PNG per image."""
    import zipfile

    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i, (img, label) in enumerate(zip(images, labels)):
            png = io.BytesIO()
            Image.fromarray(img.transpose(1, 2, 0)).save(png, format="PNG")
            z.writestr(f"pictures/{names[label]}/{i:04d}.png", png.getvalue())
    return buf.getvalue()


def pick(data, classes, per_class):
    """The first ``per_class`` images of each class in ``classes``."""
    index = np.concatenate([np.flatnonzero(data.labels == c)[:per_class] for c in classes])
    return data.images[index], data.labels[index]


@pytest.mark.slow
@pytest.mark.compiler
def test_onnx_model_with_input_spec_and_image_folder_zips(server, cifar, tmp_path):
    """An ONNX model taking 48x48 images, normalised by an input spec; CIFAR-10 PNGs in zips
    (calibration from one, validation from another), resized to 48x48 by the app; the float
    top-1 the app reports equals onnxruntime's on the same images; export everything."""
    import zipfile

    import onnxruntime as ort

    from netquant.data import CIFAR10_MEAN, CIFAR10_STD, CLASSES, load_images

    spec = {"channel_order": "RGB", "value_range": [0, 1], "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    query = f"filename=my%20net.onnx&target=gpu&input_spec={urllib.parse.quote(json.dumps(spec))}"
    model = onnx_model(tmp_path, 48)
    code, s = call(server, "POST", f"/api/sessions?{query}", raw=model)
    assert code == 200, s
    sid = s["id"]
    assert s["network"] == "my_net" and s["input_shape"] == [3, 48, 48] and s["outputs"] == 10
    assert s["input_spec"]["mean"] == list(CIFAR10_MEAN) and s["datasets"] == []  # CIFAR-10 is 32x32: not offered
    assert {p.name for p in server.app.registry.get(sid).folder.iterdir()} == {"uploaded-model.onnx"}
    code, body = call(server, "POST", f"/api/sessions/{sid}/calibrate", {"data": "cifar10", "count": 10})
    assert code == 400 and "CIFAR-10 images are 3x32x32 but my_net takes 3x48x48" in body["error"]

    # folders named by class; class_names gives the network's output order (cat is output 3)
    cal_x, cal_y = pick(cifar.train, (0, 3, 8), 8)
    val_x, val_y = pick(cifar.test, (0, 3, 8), 10)
    names = ",".join(CLASSES)
    code, cal = call(server, "POST", f"/api/sessions/{sid}/data?filename=calib.zip&class_names={names}",
                     raw=image_folder_zip(cal_x, cal_y, CLASSES))
    assert code == 200, cal
    assert cal["id"] == "data1" and cal["test"] == 24 and cal["shape"] == [3, 48, 48]
    assert cal["class_names"] == list(CLASSES)
    val_zip = image_folder_zip(val_x, val_y, CLASSES)
    code, val = call(server, "POST", f"/api/sessions/{sid}/data?filename=val.zip&class_names={names}", raw=val_zip)
    assert code == 200 and val["id"] == "data2" and [d["id"] for d in val["datasets"]] == ["data1", "data2"]

    code, _ = call(server, "POST", f"/api/sessions/{sid}/calibrate", {"data": "data1", "count": "all"})
    assert code == 200 and wait(server, sid)["state"] == "done"
    _, c = call(server, "GET", f"/api/sessions/{sid}/calibration")
    assert c["images"] == 24 and "calib" in c["source"] and len(c["rows"]) > 10
    code, _ = call(server, "POST", f"/api/sessions/{sid}/validate", {"data": "data2", "count": "all"})
    assert code == 200
    job = wait(server, sid)
    assert job["state"] == "done", job
    _, v = call(server, "GET", f"/api/sessions/{sid}/validation")
    assert v["num_samples"] == 30 and v["data"]["name"] == "val" and set(v["metrics"]) == {"top1", "top5"}
    per_class = {r["Name"]: r for r in v["per_class"]}
    assert set(per_class) == {"airplane", "cat", "ship"} and per_class["cat"]["Class"] == 3
    assert all(r["Images"] == 10 for r in per_class.values())

    # the app's float top-1 is onnxruntime's on the same resized, normalised images
    path = tmp_path / "val.zip"
    path.write_bytes(val_zip)
    images = load_images(path, size=(48, 48), class_names=CLASSES)
    assert np.array_equal(np.sort(images.labels), np.sort(val_y))
    x = (images.images.astype(np.float32) / 255 - np.array(CIFAR10_MEAN, np.float32)[:, None, None]) \
        / np.array(CIFAR10_STD, np.float32)[:, None, None]
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    ort_top1 = 100 * float((sess.run(None, {"image": x})[0].argmax(1) == images.labels).mean())
    app_top1 = v["metrics"]["top1"][0]["MetricOutput"]
    assert abs(app_top1 - ort_top1) <= 100 / 30 + 1e-9  # at most one near-tie image apart
    assert sum(r["Float top-1 %"] * r["Images"] for r in per_class.values()) / 30 == pytest.approx(app_top1)

    # exports: the quantizer (with its input spec), the int8 ONNX (which normalises too), C
    code, blob = call(server, "GET", f"/api/sessions/{sid}/export/quantizer")
    assert code == 200 and blob[:2] == b"PK"
    code, imported = call(server, "POST", "/api/import", raw=blob)
    assert code == 200 and imported["calibrated"] and imported["input_spec"] == s["input_spec"]
    code, int8_onnx = call(server, "GET", f"/api/sessions/{sid}/export/onnx")
    assert code == 200
    int8 = ort.InferenceSession(int8_onnx, providers=["CPUExecutionProvider"])
    raw = images.images.astype(np.float32) / 255  # exported networks take [0, 1] RGB, like netquant's
    int8_scores = int8.run(None, {int8.get_inputs()[0].name: raw})[0]
    int8_top1 = 100 * float((int8_scores.argmax(1) == images.labels).mean())
    assert abs(int8_top1 - v["metrics"]["top1"][1]["MetricOutput"]) <= 2 * 100 / 30 + 1e-9  # ties may round apart
    code, _ = call(server, "POST", f"/api/sessions/{sid}/codegen")
    assert code == 200 and wait(server, sid)["state"] == "done"
    code, code_zip = call(server, "GET", f"/api/sessions/{sid}/export/code")
    assert code == 200 and "net.c" in zipfile.ZipFile(io.BytesIO(code_zip)).namelist()


def test_data_set_uploads_are_checked(server, cifar, tmp_path):
    """Broken, unsafe, oversized and pickled data set uploads get a JSON error naming the
    problem; nothing is written outside the session folder."""
    import zipfile

    code, s = call(server, "POST", "/api/sessions", {"network": "cifarnet-20-16"})
    sid = s["id"]
    assert [d["id"] for d in s["datasets"]] == ["cifar10"] and s["datasets"][0]["class_names"][3] == "cat"
    code, body = call(server, "POST", f"/api/sessions/{sid}/data?filename=x.zip", raw=b"not a zip at all")
    assert code == 400 and "not a zip archive" in body["error"]
    code, body = call(server, "POST", f"/api/sessions/{sid}/data?filename=x.tar", raw=b"PK\x03\x04")
    assert code == 400 and "expected a .zip of an image folder or an .npz" in body["error"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../../escape/cat/0.png", b"x")
    code, body = call(server, "POST", f"/api/sessions/{sid}/data?filename=evil.zip", raw=buf.getvalue())
    assert code == 400 and "unsafe member name" in body["error"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("pictures/cat/0.png", bytes(3_000_000))  # compresses to a few kB
    limit = server.app.max_expanded
    server.app.max_expanded = 1_000_000
    try:
        code, body = call(server, "POST", f"/api/sessions/{sid}/data?filename=bomb.zip", raw=buf.getvalue())
    finally:
        server.app.max_expanded = limit
    assert code == 413 and "expands to 3000000 bytes, over the limit" in body["error"]
    buf = io.BytesIO()  # an object array is a pickle: never loaded
    np.savez(buf, images=np.array([{"a": 1}], dtype=object), labels=np.zeros(1, np.int64))
    code, body = call(server, "POST", f"/api/sessions/{sid}/data?filename=p.npz", raw=buf.getvalue())
    assert code == 400 and body["error"].startswith("data set p:")
    # a good .npz of CIFAR-10 test images (N, H, W, C), with class names
    buf = io.BytesIO()
    np.savez(buf, images=cifar.test.images[:12].transpose(0, 2, 3, 1), labels=cifar.test.labels[:12],
             class_names=np.array(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                   "ship", "truck"]))
    code, d = call(server, "POST", f"/api/sessions/{sid}/data?filename=twelve.npz", raw=buf.getvalue())
    assert code == 200 and d["test"] == 12 and d["shape"] == [3, 32, 32] and d["class_names"][9] == "truck"
    assert [x["id"] for x in d["datasets"]] == ["cifar10", d["id"]]
    code, body = call(server, "POST", f"/api/sessions/{sid}/calibrate", {"data": d["id"], "count": 50})
    assert code == 400 and "count must be in 1..12" in body["error"]
    code, body = call(server, "POST", f"/api/sessions/{sid}/validate", {"data": "data9"})
    assert code == 400 and "no data set 'data9'" in body["error"]
    code, body = call(server, "POST", f"/api/sessions/{sid}/data", {"path": str(tmp_path / "missing")})
    assert code == 400 and "no such file or folder" in body["error"]
    # a folder on this machine with train/ and val/ splits: calibration and validation images differ
    from PIL import Image

    for split, data in (("train", cifar.train), ("val", cifar.test)):
        for i, (img, label) in enumerate(zip(*pick(data, (3, 0), 3))):
            folder = tmp_path / "mine" / split / ("cat" if label == 3 else "other")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i}.png")
    code, d = call(server, "POST", f"/api/sessions/{sid}/data", {"path": str(tmp_path / "mine")})
    assert code == 200 and not d["same"] and d["train"] == d["test"] == 6 and d["class_names"] == ["cat", "other"]
    folder = server.app.registry.get(sid).folder
    assert all(p.parent == folder for p in folder.rglob("*"))
    assert {p.name for p in folder.iterdir()} <= {f"data-{i}{ext}" for i in range(1, 9) for ext in (".zip", ".npz")}


def test_model_and_spec_errors_are_json(server, tmp_path, monkeypatch):
    code, body = call(server, "POST", "/api/sessions?filename=net.onnx", raw=b"\x08\x07garbage protobuf")
    assert code == 400 and body["error"].startswith("upload")
    code, body = call(server, "POST", "/api/sessions", {"network": "cifarnet-20-16", "input_spec": {"mean": [0.5, 0.5]}})
    assert code == 400 and "input spec" in body["error"]
    code, body = call(server, "POST", "/api/sessions", {"network": "cifarnet-20-16", "input_spec": {"gamma": 2}})
    assert code == 400 and "unknown field(s) ['gamma']" in body["error"]
    code, body = call(server, "POST", "/api/sessions", {"network": "cifarnet-20-16", "input_spec": {"mean": "a,b,c"}})
    assert code == 400 and "expected numbers" in body["error"]
    code, body = call(server, "POST", "/api/sessions", {"input_shape": "3,x,4", "model_path": str(tmp_path / "n.onnx")})
    assert code == 400 and "input_shape '3,x,4'" in body["error"]
    # whatever a handler raises comes back as JSON, not a dropped connection
    monkeypatch.setattr(server.app, "networks", lambda: 1 / 0)
    code, body = call(server, "GET", "/api/networks")
    assert code == 500 and body["error"] == "ZeroDivisionError: division by zero"
