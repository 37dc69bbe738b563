"""Fuzzing the readers of files a user hands netquant (issue 11): the quantizer-file loader, the
CIFAR-10 readers (archive, binary and python batches) and the image-folder, zip and .npz readers.
Each mutated input (truncated, bytes flipped, members replaced, oversized or malformed) either
loads or raises a NetquantError, never anything else; each run is bounded in examples and time."""
import io
import json
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from netquant.data import load_images, open_data, read_sample
from netquant.data.cifar10 import parse_binary_batch, parse_python_batch, read_cifar10
from netquant.errors import NetquantError
from netquant.quantizer import Quantizer

FUZZ = settings(max_examples=40, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def sample():
    return read_sample()


@pytest.fixture(scope="module")
def quantizer_bytes(sample, tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    q = Quantizer(Tiny().eval())
    q.calibrate(sample.train.images[:8])
    path = tmp_path_factory.mktemp("fuzz") / "q.nq"
    q.save(path)
    return Blob(path.read_bytes())


class Blob(bytes):
    """File bytes that a failing example prints by size, not in full."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


def _loads_or_netquant_error(fn, *args):
    """fn(*args) returns, or raises a NetquantError; anything else fails the test."""
    try:
        return fn(*args)
    except NetquantError:
        return None


def _mutate(data: bytes, how: str, a: int, b: int, blob: bytes) -> bytes:
    n = len(data)
    if how == "truncate":
        return data[:a % (n + 1)]
    if how == "flip":
        out = bytearray(data)
        for k in range(1 + b % 4):
            out[(a * (k + 1) * 7919) % n] ^= 1 << (b + k) % 8
        return bytes(out)
    if how == "splice":   # random bytes over a stretch of the file
        i = a % n
        return data[:i] + blob + data[i + len(blob):]
    return data[:a % (n + 1)] + blob + data[a % (n + 1):]   # insert


MUTATION = st.tuples(st.sampled_from(["truncate", "flip", "splice", "insert"]), st.integers(0, 10 ** 9),
                     st.integers(0, 63), st.binary(min_size=1, max_size=64))


def _members(data: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n: z.read(n) for n in z.namelist()}


def _zip(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            z.writestr(n, d)
    return buf.getvalue()


# --- the quantizer file ---------------------------------------------------------------------

@FUZZ
@given(mutation=MUTATION)
def test_quantizer_file_bytes(quantizer_bytes, tmp_path, mutation):
    path = tmp_path / "m.nq"
    path.write_bytes(_mutate(quantizer_bytes, *mutation))
    _loads_or_netquant_error(Quantizer.load, path)


@FUZZ
@given(member=st.sampled_from(["manifest.json", "graph.safetensors", "stats.safetensors"]), mutation=MUTATION)
def test_quantizer_members(quantizer_bytes, tmp_path, member, mutation):
    """A member mutated and the zip written whole again (its CRC then matches): the parsers and
    the checks must catch what the zip layer no longer does."""
    files = _members(quantizer_bytes)
    files[member] = _mutate(files[member], *mutation)
    path = tmp_path / "m.nq"
    path.write_bytes(_zip(files))
    _loads_or_netquant_error(Quantizer.load, path)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) |
                    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


def _paths(obj, prefix=()):
    """Every path into a JSON value (keys and list indexes)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from _paths(v, prefix + (i,))


@settings(FUZZ, max_examples=25)
@given(pick=st.integers(0, 10 ** 9), value=JSON)
def test_quantizer_manifest_values(quantizer_bytes, tmp_path, pick, value):
    """One value anywhere in the manifest replaced by any JSON value."""
    files = _members(quantizer_bytes)
    manifest = json.loads(files["manifest.json"])
    paths = [p for p in _paths(manifest) if p]
    target = paths[pick % len(paths)]
    node = manifest
    for k in target[:-1]:
        node = node[k]
    node[target[-1]] = value
    files["manifest.json"] = json.dumps(manifest, allow_nan=True).encode()
    path = tmp_path / "m.nq"
    path.write_bytes(_zip(files))
    _loads_or_netquant_error(Quantizer.load, path)


# --- CIFAR-10 -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batches(sample):
    from netquant.data.cifar10 import encode_binary_batch

    binary = encode_binary_batch(sample.test.images[:4], sample.test.labels[:4])
    python = pickle.dumps({b"data": sample.test.images[:4].reshape(4, -1), b"labels": list(sample.test.labels[:4])},
                          protocol=2)
    return Blob(binary), Blob(python)


@FUZZ
@given(mutation=MUTATION)
def test_cifar_batches(batches, mutation):
    binary, python = batches
    got = _loads_or_netquant_error(parse_binary_batch, _mutate(binary, *mutation), "b")
    if got is not None:
        images, labels = got
        assert images.shape[1:] == (3, 32, 32) and len(images) == len(labels) and labels.max(initial=0) <= 9
    got = _loads_or_netquant_error(parse_python_batch, _mutate(python, *mutation), "p")
    if got is not None:
        images, labels = got
        assert images.shape[1:] == (3, 32, 32) and len(images) == len(labels)


@pytest.fixture(scope="module")
def cifar_archive(batches) -> bytes:
    """A .tar.gz with the binary version's member names (the md5s then fail: what matters is the
    archive layer, which reads and inflates before any checksum is known)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin",
                     "data_batch_5.bin", "test_batch.bin"]:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(batches[0])
            tar.addfile(info, io.BytesIO(batches[0]))
    return Blob(buf.getvalue())


@FUZZ
@given(mutation=MUTATION)
def test_cifar_archive(cifar_archive, tmp_path, mutation):
    path = tmp_path / "cifar-10-binary.tar.gz"
    path.write_bytes(_mutate(cifar_archive, *mutation))
    with pytest.raises(NetquantError):   # a mutated archive, or the md5s of these small batches
        read_cifar10(path)


# --- image folders, zips, .npz --------------------------------------------------------------

def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_zip(sample) -> bytes:
    files = {}
    for i in range(4):
        cls = sample.test.class_name(sample.test.labels[i])
        files[f"train/{cls}/{i}.png"] = _png(sample.test.images[i])
        files[f"val/{cls}/{i}.png"] = _png(sample.test.images[i])
    return Blob(_zip(files))


@FUZZ
@given(mutation=MUTATION)
def test_image_zip(image_zip, tmp_path, mutation):
    path = tmp_path / "images.zip"
    path.write_bytes(_mutate(image_zip, *mutation))
    got = _loads_or_netquant_error(open_data, str(path))
    if got is not None:
        assert got.train.images.ndim == 4 and len(got.train.images) == len(got.train.labels)


@FUZZ
@given(which=st.integers(0, 7), mutation=MUTATION)
def test_image_file_in_a_folder(image_zip, tmp_path, which, mutation):
    """One image file of an image folder mutated: it is read or refused naming it."""
    files = _members(image_zip)
    name = sorted(files)[which]
    files[name] = _mutate(files[name], *mutation)
    root = tmp_path / "set"
    for n, d in files.items():
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(d)
    _loads_or_netquant_error(lambda: open_data(str(root), size=(32, 32)))


@pytest.fixture(scope="module")
def npz_bytes(sample) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, images=sample.test.images[:4], labels=sample.test.labels[:4])
    return Blob(buf.getvalue())


@FUZZ
@given(mutation=MUTATION)
def test_npz(npz_bytes, tmp_path, mutation):
    path = tmp_path / "set.npz"
    path.write_bytes(_mutate(npz_bytes, *mutation))
    got = _loads_or_netquant_error(load_images, path)
    if got is not None:
        assert got.images.ndim == 4 and len(got.images) == len(got.labels)


def test_npz_bombs_are_refused_before_allocating(sample, tmp_path):
    """An .npz whose images header declares a 3 GB array on a few bytes, and one whose member claims
    to inflate to 3 GiB: refused before numpy allocates or inflates anything (memory stays small)."""
    import resource

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (1_000_000, 3, 32, 32)})
    labels = io.BytesIO()
    np.save(labels, np.zeros(1_000_000, np.int64)[:4])
    liar = tmp_path / "liar.npz"
    liar.write_bytes(_zip({"images.npy": b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + bytes(100),
                           "labels.npy": labels.getvalue()}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(NetquantError,
                       match=r"member images.npy declares a uint8 array of shape \(1000000, 3, 32, 32\)"):
        load_images(liar)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=sample.test.images[:4], labels=sample.test.labels[:4])
    data = bytearray(buf.getvalue())
    i = data.find(b"PK\x01\x02")
    while i >= 0:   # the central directory claims 3 GiB for every member
        data[i + 24:i + 28] = (3 << 30).to_bytes(4, "little")
        i = data.find(b"PK\x01\x02", i + 4)
    bomb = tmp_path / "bomb.npz"
    bomb.write_bytes(bytes(data))
    with pytest.raises(NetquantError, match="inflates to 3,221,225,472 bytes"):
        load_images(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300_000   # KB: nothing big allocated


# --- the app's upload handlers --------------------------------------------------------------
# The uploads go through the App's own methods (what the HTTP handler calls after reading the
# body), no server started: a mutated or oversized upload is accepted or refused with an
# HttpError (the page's 4xx) or a NetquantError, never anything else (the handler would answer
# 500 "internal error" for that).

from netquant.app.inputs import HttpError, load_npy   # noqa: E402
from netquant.app.server import App   # noqa: E402

APP_EXPANDED = 4 << 20   # the app's limit on what an uploaded zip inflates to, small for the test


def _app_call(fn, *args):
    """fn(*args) returns, or raises HttpError / NetquantError; anything else fails the test, and
    so does a peak memory 300 MB over the one before (a member claiming 4 GiB is never inflated)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        return fn(*args)
    except (HttpError, NetquantError):
        return None
    finally:
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300_000   # KB


def _oversize(data: bytes, which: int, size: int) -> bytes:
    """The zip with member number ``which`` claiming to inflate to ``size`` bytes (its central
    directory entry edited: what zipfile believes before inflating anything)."""
    out = bytearray(data)
    entries = []
    i = out.find(b"PK\x01\x02")
    while i >= 0:
        entries.append(i)
        i = out.find(b"PK\x01\x02", i + 4)
    if entries:
        j = entries[which % len(entries)]
        out[j + 24:j + 28] = min(size, 2 ** 32 - 1).to_bytes(4, "little")
    return bytes(out)


# a mutation of MUTATION, or ("oversize", member, claimed size), or ("big", -, megabytes): a real
# member of zeros that inflates past the app's limit (a zip bomb in small)
UPLOAD_MUTATION = st.one_of(MUTATION, st.tuples(st.just("oversize"), st.integers(0, 20),
                                               st.sampled_from([APP_EXPANDED + 1, 300 << 20, 2 ** 32 - 1]),
                                               st.just(b"")),
                            st.tuples(st.just("big"), st.integers(0, 20), st.integers(5, 8), st.just(b"")))


def _mutate_upload(data: bytes, mutation) -> bytes:
    how, a, b, blob = mutation
    if how == "oversize":
        return _oversize(data, a, b)
    if how == "big":
        files = _members(data)
        if "images.npy" in files:   # an .npz: its images array b MiB of zeros (labels then disagree)
            buf = io.BytesIO()
            np.save(buf, np.zeros(((b << 20) // 3072, 3, 32, 32), np.uint8))
            files["images.npy"] = buf.getvalue()
        else:                       # an image folder: a b MiB "image" of zeros in one class
            folders = sorted({n.rsplit("/", 1)[0] for n in files if "/" in n})
            files[f"{folders[a % len(folders)]}/zeros.png"] = bytes(b << 20)
        return _zip(files)
    return _mutate(data, how, a, b, blob)


@pytest.fixture(scope="module")
def app(quantizer_bytes, tmp_path_factory):
    """An App on the embedded CIFAR-10 sample and a session holding the tiny quantizer."""
    a = App(data_spec="sample", max_expanded=APP_EXPANDED, workdir=tmp_path_factory.mktemp("app"))
    a.sid = a.import_quantizer(quantizer_bytes)["id"]
    yield a
    for sid in list(a.registry.sessions):
        a.registry.discard(a.registry.sessions[sid])


@FUZZ
@given(mutation=UPLOAD_MUTATION)
def test_app_import_quantizer(app, quantizer_bytes, mutation):
    """POST /api/import: a mutated .nq (truncated, flipped, members claiming 300 MiB or 4 GiB)."""
    before = set(app.registry.sessions)
    how = mutation[0]
    data = _mutate_upload(quantizer_bytes, mutation) if how != "big" else _zip(
        {**_members(quantizer_bytes), "graph.safetensors": bytes(mutation[2] << 20)})
    out = _app_call(app.import_quantizer, data)
    if out is not None:
        assert out["input_shape"] == [3, 32, 32]
        app.registry.discard(app.registry.get(out["id"]))
    assert set(app.registry.sessions) == before   # a refused import leaves no session


@pytest.fixture(scope="module")
def app_npz(sample) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=sample.test.images[:4], labels=sample.test.labels[:4])
    return Blob(buf.getvalue())


@FUZZ
@given(kind=st.sampled_from(["zip", "npz"]), named=st.booleans(), mutation=UPLOAD_MUTATION)
def test_app_data_upload(app, image_zip, app_npz, kind, named, mutation):
    """POST /api/sessions/ID/data: a mutated image-folder .zip or .npz, with its file name or
    without (the kind then sniffed from the bytes)."""
    data = _mutate_upload(image_zip if kind == "zip" else app_npz, mutation)
    out = _app_call(app.add_data, app.sid, {"filename": f"set.{kind}" if named else ""}, data)
    if out is not None:
        assert out["id"].startswith("data")
        s = app.registry.get(app.sid)
        d = s.datasets.pop(out["id"])   # keep the session small across examples
        assert d.train.images.shape[1:] == (3, 32, 32) and len(d.train.images) == len(d.train.labels)
    if mutation[0] == "big" and kind == "zip" and named:
        assert out is None   # inflates past the limit: refused (413) before reading an image


@pytest.fixture(scope="module")
def npy_bytes(sample) -> bytes:
    buf = io.BytesIO()
    np.save(buf, sample.test.images[:4])
    return Blob(buf.getvalue())


@FUZZ
@given(mutation=st.one_of(MUTATION, st.tuples(st.just("header"), st.integers(1, 2 ** 40), st.integers(0, 3),
                                                st.just(b""))))
def test_app_calibration_npy(npy_bytes, tmp_path, mutation):
    """POST /api/sessions/ID/calibrate with a .npy body: mutated, or its header declaring up to
    2^40 images on 4 images' bytes (refused before numpy allocates them)."""
    how, a, b, blob = mutation
    if how == "header":
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": ["|u1", "<f4", "<f8", "|i1"][b],
                                                      "fortran_order": False, "shape": (a, 3, 32, 32)})
        data = header.getvalue() + npy_bytes[len(header.getvalue()):]
    else:
        data = _mutate(npy_bytes, how, a, b, blob)
    arr = _app_call(load_npy, data, tmp_path, (3, 32, 32))
    if arr is not None:
        assert arr.shape[1:] == (3, 32, 32) and arr.dtype in (np.uint8, np.float32, np.float64, np.float16)
