"""Reliability (issue 11): nothing lost, nothing read out of bounds, one clear line for every bad
input. Saves killed at random moments leave the old or the new file; corrupt, edited or inflated
quantizer files fail with one QuantizerFileError naming the file and member; the compiled
library refuses every wrong shape and dtype before the C runs; the CLI prints one line (exit 2)
for user errors, a traceback for bugs (exit 1) and exits 130 on Ctrl-C; and the minor probes."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from netquant.cli import main
from netquant.data import read_sample
from netquant.errors import (ArgumentError, DataError, InputError, MetricError, NetquantError,
                             QuantizerFileError)
from netquant.quantizer import Quantizer

ROOT = Path(__file__).resolve().parents[1]


class Small(nn.Module):
    """conv-bn-relu, conv-relu, global pool, fc: a tiny CIFAR classifier (~10k parameters);
    ``width`` 64 makes the saved file ~200 KB, so a save takes long enough to be killed in."""

    def __init__(self, width: int = 8, channels: int = 3, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def small_net(width=8, seed=0, **kw):
    torch.manual_seed(seed)
    return Small(width, **kw).eval()


@pytest.fixture(scope="module")
def sample():
    return read_sample()   # the first 1,000 real CIFAR-10 training and test images, shipped


@pytest.fixture(scope="module")
def small_q(sample):
    q = Quantizer(small_net())
    q.calibrate(sample.train.images[:16])
    return q


@pytest.fixture()
def saved(small_q, tmp_path):
    path = tmp_path / "q.nq"
    small_q.save(path)
    return path


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- atomic saves ----------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork: POSIX only")
def test_sigkill_during_save_leaves_the_old_or_the_new_file(sample, tmp_path):
    """A child saves two quantizers over one file in a loop; the parent SIGKILLs it at random
    moments, 15 times (more, up to 40, until one kill has landed inside a save, which leaves its
    temporary file): the file always loads, as one of the two."""
    qa = Quantizer(small_net(64, seed=1))
    qa.calibrate(sample.train.images[:8])
    qb = Quantizer(small_net(64, seed=1))
    qb.calibrate(sample.train.images[:8])
    qb.set_quantize("conv2", False)
    path = tmp_path / "big.nq"
    qa.save(path)
    t0 = time.perf_counter()
    qa.save(tmp_path / "timing.nq")
    save_s = time.perf_counter() - t0
    qb.save(tmp_path / "b.nq")
    whole = {(tmp_path / "timing.nq").read_bytes(), (tmp_path / "b.nq").read_bytes()}   # saves are deterministic
    assert len(whole) == 2
    rng = random.Random(0)
    seen = set()
    for i in range(40):
        if i >= 15 and any(p.name.endswith(".part") for p in tmp_path.iterdir()):
            break
        pid = os.fork()
        if pid == 0:   # child: save over the file until killed
            try:
                k = i
                while True:
                    (qa if k % 2 else qb).save(path)
                    k += 1
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0, 3 * save_s))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert path.read_bytes() in whole   # the old file or the whole new one, byte for byte
        seen.add(Quantizer.load(path).user_float)
    assert seen <= {qa.user_float, qb.user_float} and qb.user_float
    # the kills landed inside saves: their temporary files are left (hidden, beside the target)
    parts = [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
    assert parts and all(p.startswith(".big.nq.") for p in parts), parts


def test_failed_save_keeps_the_old_file(small_q, saved, monkeypatch):
    """An error in the middle of a save (a full disk, Ctrl-C) leaves the old file and no temp file."""
    import netquant.quant.io as qio

    before = saved.read_bytes()

    def full_disk(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qio, "_tensors_bytes", lambda arrays: full_disk())
    with pytest.raises(OSError, match="No space left"):
        small_q.save(saved)
    monkeypatch.undo()
    assert saved.read_bytes() == before and sorted(p.name for p in saved.parent.iterdir()) == ["q.nq"]


def test_atomic_write_keeps_mode_and_cleans_up(tmp_path):
    from netquant.fileio import atomic_write, write_text

    p = tmp_path / "a.txt"
    write_text(p, "old")
    os.chmod(p, 0o640)
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(p, "w") as f:
            f.write("new, half")
            raise KeyboardInterrupt
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
    write_text(p, "new")
    assert p.read_text() == "new" and (p.stat().st_mode & 0o777) == 0o640
    with pytest.raises(NetquantError, match="does not exist") as e:
        write_text(tmp_path / "no" / "x.txt", "x")
    assert isinstance(e.value, FileNotFoundError)


# --- quantizer files: corrupt, edited, inflated ---------------------------------------------

def test_interrupted_generate_leaves_the_old_sources(small_q, tmp_path, monkeypatch):
    """Ctrl-C while the C source is streamed out: every file under its final name is still the
    old, complete one (each is written to a temporary file and renamed), and no temporary file
    stays (a plain write would leave the source cut after its first piece)."""
    from netquant.codegen import generate
    from netquant.codegen.c import CPrinter

    qnet = small_q.quantize()
    generate(qnet, tmp_path, name="small", isa="scalar")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    chunks = CPrinter.source_chunks

    def interrupted(self):
        yield next(iter(chunks(self)))
        raise KeyboardInterrupt
    monkeypatch.setattr(CPrinter, "source_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(qnet, tmp_path, name="small", isa="scalar")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _members(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def _rewrite(path, files: dict) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            z.writestr(n, d)


def test_flipped_byte_names_the_member(saved):
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as z:
        info = z.getinfo("graph.safetensors")
    offset = info.header_offset + 30 + len(info.filename) + info.compress_size // 2   # inside the deflated data
    data[offset] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(QuantizerFileError, match=r"q\.nq: member graph\.safetensors: cannot be inflated"):
        Quantizer.load(saved)


def test_member_replaced_and_manifest_malformed(saved):
    files = _members(saved)
    for member, blob, message in [
            ("graph.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ",
             "member graph.safetensors: not a safetensors"),
            ("stats.safetensors", os.urandom(300), "member stats.safetensors: not a safetensors"),
            ("manifest.json", b"[1, 2, 3]", "member manifest.json: expected a JSON object, got a list"),
            ("manifest.json", b"{\"format\": ", "member manifest.json: not valid JSON"),
            ("manifest.json", b"\xff\xfe", "member manifest.json: not valid JSON")]:
        _rewrite(saved, {**files, member: blob})
        with pytest.raises(QuantizerFileError, match=message):
            Quantizer.load(saved)
    manifest = json.loads(files["manifest.json"])
    for key, value, message in [("graph", [], "'graph' should be dict"), ("target", 3, "'target' should be str"),
                                ("float_layers", ["nope"], "float_layers names 'nope'"),
                                ("config", {"scale": "cubic"}, "config:")]:
        _rewrite(saved, {**files, "manifest.json": json.dumps({**manifest, key: value}).encode()})
        with pytest.raises(QuantizerFileError, match=message):
            Quantizer.load(saved)
    del files["stats.safetensors"]
    _rewrite(saved, files)
    with pytest.raises(QuantizerFileError, match="member stats.safetensors: missing"):
        Quantizer.load(saved)


@pytest.mark.parametrize("value, message", [
    (float("nan"), "expected finite min <= max"), (0.0, "max 0 is not in the highest non-empty histogram bin"),
    (-1.0, "expected finite min <= max"), (1e30, "expected a power of two >= |min|, |max|"),
    ("3.5", "max '3.5': expected a number"), (None, "max None: expected a number")])
def test_edited_statistics_are_refused_naming_the_layer(saved, value, message):
    files = _members(saved)
    manifest = json.loads(files["manifest.json"])
    stats = manifest["ranges"]["stats"]
    i = next(i for i, s in enumerate(stats) if s["kind"] == "Activations" and s["node"].startswith("conv2"))
    stats[i]["max"] = value
    _rewrite(saved, {**files, "manifest.json": json.dumps(manifest, allow_nan=True).encode()})
    with pytest.raises(QuantizerFileError, match=f"layer {stats[i]['node']}") as e:
        Quantizer.load(saved)
    assert message in str(e.value) and "q.nq" in str(e.value)


def test_edited_histogram_and_counts(saved):
    from safetensors.numpy import load, save

    files = _members(saved)
    arrays = load(files["stats.safetensors"])
    key = next(k for k in arrays if k.endswith("/hist"))
    arrays[key] = arrays[key].copy()
    arrays[key][0] += 5
    _rewrite(saved, {**files, "stats.safetensors": save(arrays)})
    with pytest.raises(QuantizerFileError, match="the histogram holds .* values, count says"):
        Quantizer.load(saved)


def _forge_size(path, member: str, size: int) -> None:
    """Make the zip claim ``member`` inflates to ``size`` bytes (local header and central
    directory), as a zip bomb does: the loader must refuse it before inflating anything."""
    data = bytearray(Path(path).read_bytes())
    name = member.encode()
    local = data.find(b"PK\x03\x04")
    while local >= 0:
        n = int.from_bytes(data[local + 26:local + 28], "little")
        if data[local + 30:local + 30 + n] == name:
            data[local + 22:local + 26] = size.to_bytes(4, "little")
        local = data.find(b"PK\x03\x04", local + 4)
    central = data.find(b"PK\x01\x02")
    while central >= 0:
        n = int.from_bytes(data[central + 28:central + 30], "little")
        if data[central + 46:central + 46 + n] == name:
            data[central + 24:central + 28] = size.to_bytes(4, "little")
        central = data.find(b"PK\x01\x02", central + 4)
    Path(path).write_bytes(bytes(data))


def test_zip_bomb_is_refused_before_inflating(saved):
    """A member that claims 2 GiB in a file of a few KB is refused at once, naming it; a manifest
    over 64 MiB too; the real inflation never starts (the test takes milliseconds, not 28 s)."""
    _forge_size(saved, "graph.safetensors", 2 ** 31)
    t0 = time.perf_counter()
    with pytest.raises(QuantizerFileError,
                       match=r"member graph\.safetensors: inflates to 2,147,483,648 bytes.*zip bomb"):
        Quantizer.load(saved)
    assert time.perf_counter() - t0 < 1.0


def test_whitespace_after_the_manifest_is_capped(saved, monkeypatch):
    import netquant.quant.io as qio

    files = _members(saved)
    monkeypatch.setattr(qio, "MANIFEST_MAX_BYTES", 1 << 20)   # the 64 MiB cap, scaled down to keep the test fast
    _rewrite(saved, {**files, "manifest.json": files["manifest.json"] + b" " * (2 << 20)})
    with pytest.raises(QuantizerFileError, match="member manifest.json: inflates to"):
        Quantizer.load(saved)


def test_statistics_of_another_network_and_calibration_files(small_q, saved, tmp_path, sample):
    other = Quantizer(small_net(seed=5))
    other.calibrate(sample.train.images[:8])
    o = tmp_path / "o.nq"
    other.save(o)
    files, theirs = _members(saved), _members(o)
    manifest, their_manifest = json.loads(files["manifest.json"]), json.loads(theirs["manifest.json"])
    manifest["ranges"] = their_manifest["ranges"]
    _rewrite(saved, {**files, "manifest.json": json.dumps(manifest).encode(),
                     "stats.safetensors": theirs["stats.safetensors"]})
    with pytest.raises(QuantizerFileError, match="do not belong to its network"):
        Quantizer.load(saved)
    cal = tmp_path / "c.nqc"
    small_q.save_calibration(cal)
    files = _members(cal)
    manifest = json.loads(files["manifest.json"])
    manifest["ranges"]["stats"][0]["count"] = -3
    _rewrite(cal, {**files, "manifest.json": json.dumps(manifest).encode()})
    with pytest.raises(QuantizerFileError, match="c.nqc: member manifest.json.*count -3"):
        small_q.load_calibration(cal)


# --- the compiled library: every wrong shape and dtype, in a subprocess ----------------------

PREDICT_SCRIPT = textwrap.dedent('''
    import sys
    import numpy as np, torch
    sys.path.insert(0, sys.argv[2])
    from test_reliability import small_net
    from netquant.codegen import generate, load
    from netquant.data import read_sample
    from netquant.errors import NetquantError
    from netquant.quantizer import Quantizer

    q = Quantizer(small_net())
    q.calibrate(read_sample().train.images[:8])
    net = load(generate(q.quantize(), sys.argv[1], name="small", isa="scalar"))
    good = np.zeros((2, 3, 32, 32), np.float32)
    ok = net.predict(good)
    assert ok.shape == (2, 10), ok.shape
    cases = {
        "predict_int8 (4, 1)": lambda: net.predict_int8(np.zeros((4, 1), np.int8)),
        "predict_int8 (20000, 1)": lambda: net.predict_int8(np.zeros((20000, 1), np.int8)),
        "predict_int8 float": lambda: net.predict_int8(np.ones((2, 3, 32, 32), np.float32)),
        "predict_int8 int32": lambda: net.predict_int8(np.ones((2, 3, 32, 32), np.int32)),
        "predict_int8 NHWC": lambda: net.predict_int8(np.zeros((2, 32, 32, 3), np.int8)),
        "predict_int8 3-D": lambda: net.predict_int8(np.zeros((3, 32, 32), np.int8)),
        "predict_int8 None": lambda: net.predict_int8(None),
        "predict (20000, 1)": lambda: net.predict(np.zeros((20000, 1), np.float32)),
        "predict int32": lambda: net.predict(np.full((2, 3, 32, 32), 200, np.int32)),
        "predict int64": lambda: net.predict(np.full((2, 3, 32, 32), 200, np.int64)),
        "predict bool": lambda: net.predict(np.zeros((2, 3, 32, 32), bool)),
        "predict object": lambda: net.predict(np.array([[1, "a"]], dtype=object)),
        "predict 5-D": lambda: net.predict(np.zeros((1, 2, 3, 32, 32), np.float32)),
        "predict scalar": lambda: net.predict(np.float32(0)),
        "predict NaN": lambda: net.predict(np.full((1, 3, 32, 32), np.nan, np.float32)),
        "predict_int (1, 3, 16, 16)": lambda: net.predict_int(np.zeros((1, 3, 16, 16), np.float32)),
        "predict_int complex": lambda: net.predict_int(np.zeros((1, 3, 32, 32), np.complex64)),
        "set_num_threads -1": lambda: net.set_num_threads(-1),
    }
    for name, call in cases.items():
        try:
            call()
            print("ACCEPTED", name)
        except NetquantError as e:
            print("REFUSED", name, "|", e)
    # the C entry points themselves check the buffer lengths (in elements) before any read/write
    import ctypes
    fp, ip, qp = (ctypes.POINTER(t) for t in (ctypes.c_float, ctypes.c_int32, ctypes.c_int8))
    q8 = np.zeros(4, np.int8)   # 4 bytes, where 2 images need 2 * 3072
    scores = np.full(20, 7, np.float32)
    ints = np.zeros(2 * net.program.buffer(net.program.int_output).elements, np.int32)
    tiny = np.zeros(8, np.float32)
    raw = {
        "predict short images": net.raw_call(tiny.ctypes.data_as(fp), tiny.size, 2, scores.ctypes.data_as(fp), 20),
        "predict short scores": net.raw_call(good.ctypes.data_as(fp), good.size, 2, scores.ctypes.data_as(fp), 19),
        "predict_int8 short": net.raw_call(q8.ctypes.data_as(qp), q8.size, 2, scores.ctypes.data_as(fp), 20,
                                           entry="predict_int8"),
        "predict_int short out": net.raw_call(good.ctypes.data_as(fp), good.size, 2, ints.ctypes.data_as(ip),
                                              ints.size - 1, entry="predict_int"),
        "predict huge n": net.raw_call(good.ctypes.data_as(fp), good.size, 2 ** 31 - 1, scores.ctypes.data_as(fp), 20),
    }
    for name, rc in raw.items():
        print("RAW", name, "|", rc, net.error_string(rc))
    assert (scores == 7).all(), "a refused call wrote to the scores"
    assert net.raw_call(good.ctypes.data_as(fp), good.size, 2, scores.ctypes.data_as(fp), 20) == 0
    # strided, Fortran-ordered and non-native-endian views are copied, not misread
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    ref = net.predict(x)
    assert np.array_equal(net.predict(np.asfortranarray(x)), ref)
    assert np.array_equal(net.predict(np.concatenate([x, x])[::2]), net.predict(np.concatenate([x, x])[::2].copy()))
    assert np.array_equal(net.predict(x.astype(">f4")), ref)
    assert np.array_equal(net.predict(torch.from_numpy(x).requires_grad_()), ref)
    net.close()
    try:
        net.predict(x)
        print("ACCEPTED after close")
    except NetquantError as e:
        print("REFUSED after close |", e)
    print("DONE")
''')


@pytest.mark.compiler
@pytest.mark.slow   # a fresh interpreter and a compile: ~10 s
def test_predict_refuses_every_wrong_shape_and_dtype(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PREDICT_SCRIPT, str(tmp_path), str(ROOT / "tests")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"rc {proc.returncode} (a negative rc is a signal: a crash)\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    assert lines[-1] == "DONE"
    accepted = [line for line in lines if line.startswith("ACCEPTED")]
    assert not accepted, accepted
    refused = {line.split(" |")[0][len("REFUSED "):]: line.split(" | ")[1]
               for line in lines if line.startswith("REFUSED")}
    assert len(refused) == 19
    assert "expected images of shape (N, 3, 32, 32), got (20000, 1)" in refused["predict_int8 (20000, 1)"]
    assert "expected int8 images" in refused["predict_int8 float"]
    assert "expected uint8 images (0..255) or float images in [0, 1], got dtype int32" in refused["predict int32"]
    assert "NaN or inf" in refused["predict NaN"]
    assert "closed" in refused["after close"]
    raw = [line for line in lines if line.startswith("RAW")]
    buffer_error = "| 5 a buffer is shorter than n images or n outputs"
    assert len(raw) == 5 and all(line.endswith(buffer_error) for line in raw), raw


# --- the CLI: one line, a bug's traceback, Ctrl-C -----------------------------------------

def test_cli_user_errors_are_one_line_and_checked_before_work(capsys, tmp_path, saved):
    cases = [
        (["tile", "--count", "0"], "--count: expected a positive number of images, got 0"),
        (["tile", "--data", "sample", "--count", "100000", "--out", str(tmp_path / "t.png")], "tile count: expected 1..1000"),
        (["validate", "--metric", "top3"], "unknown metric 'top3'"),
        (["calibrate", "--out", "/dev/null/x"], "--out /dev/null/x: /dev/null is not an existing folder"),
        (["quantize", "--out", str(tmp_path)], "is a folder, expected a file name"),
        (["validate", "--quantizer", str(saved), "--model", "cifarnet-20-16"], "--quantizer and --model together"),
        (["validate", "--metric", "nowhere.py:f"], "nowhere.py: no such file"),
    ]
    for argv, message in cases:
        t0 = time.perf_counter()
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert time.perf_counter() - t0 < 10, f"{argv}: checked only after work started"
    assert not (tmp_path / "t.png").exists()


def test_cli_empty_data_env(capsys, monkeypatch):
    monkeypatch.setenv("NETQUANT_DATA", "")
    rc, _, err = run_cli(capsys, "tile", "--out", "/tmp/never-written.png")
    assert rc == 2 and "NETQUANT_DATA is set but empty" in err and err.count("\n") == 1
    monkeypatch.delenv("NETQUANT_DATA")
    rc, _, err = run_cli(capsys, "tile", "--data", "", "--out", "/tmp/never-written.png")
    assert rc == 2 and "--data is empty" in err


def test_cli_corrupt_quantizer_is_one_line(capsys, saved):
    _forge_size(saved, "graph.safetensors", 2 ** 31)
    rc, _, err = run_cli(capsys, "quantize", "--quantizer", str(saved), "--out", str(saved))
    assert rc == 2 and err.count("\n") == 1 and "zip bomb" in err and "Traceback" not in err


def test_cli_no_compiler_is_one_line(capsys, saved, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-netquant")
    rc, _, err = run_cli(capsys, "codegen", "--quantizer", str(saved), "--out", str(tmp_path / "c"))
    assert rc == 2 and "Traceback" not in err and "generate" not in err, err   # checked before loading or generating
    assert err.strip().splitlines() == ["netquant codegen: error: no C compiler found (looked for "
                                        "'no-such-compiler-netquant'): install one, e.g. 'apt-get install gcc' "
                                        "(Debian/Ubuntu) or 'xcode-select --install' (macOS), or set CC"], err


def test_cli_a_bug_prints_its_traceback_and_says_so(capsys, monkeypatch):
    import netquant.cli as cli

    def broken(args):
        return np.zeros(3) + np.zeros(4)   # numpy's own ValueError: not a message for the user

    monkeypatch.setattr(cli, "cmd_analyze", broken)
    rc, _, err = run_cli(capsys, "analyze")
    assert rc == 1 and "Traceback" in err and "this is a bug in netquant" in err, err

    def misuse(args):   # a ValueError that netquant's own code raises, but no NetquantError: a bug too
        from netquant.fileio import atomic_write

        with atomic_write("/tmp/never-written", "rb"):
            pass

    monkeypatch.setattr(cli, "cmd_analyze", misuse)
    rc, _, err = run_cli(capsys, "analyze")
    assert rc == 1 and "Traceback" in err and "mode must be 'w' or 'wb'" in err, err


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child: POSIX")
@pytest.mark.slow   # a fresh interpreter that loads a network and data: ~10 s
def test_cli_sigint_exits_130_with_one_line_and_no_partial_file(tmp_path):
    out = tmp_path / "q.nq"
    proc = subprocess.Popen([sys.executable, "-m", "netquant.cli", "calibrate", "--data", "sample",
                             "--calibration", "1000", "--out", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            # as from a terminal: a suite started in the background (`make test &`)
                            # inherits SIGINT ignored, and Python then installs no Ctrl-C handler
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = ""
    deadline = time.time() + 120
    while "calibrating on" not in line and time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [x for x in err.splitlines() if x.strip() and "\r" not in x and not x.startswith("calibrating on")]
    assert "Traceback" not in err and lines == ["netquant calibrate: interrupted"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- the minor probes of the API -------------------------------------------------------------

def test_bad_images_and_labels(small_q, sample):
    x = sample.test.images[:8]
    y = sample.test.labels[:8]
    with pytest.raises(InputError, match="got None"):
        small_q.validate(None)
    with pytest.raises(InputError, match="labels are None"):
        small_q.validate((x, None))
    with pytest.raises(InputError, match="float images with values up to 2"):
        small_q.calibrate(x.astype(np.float32))
    with pytest.raises(InputError, match="float images with values up to"):
        small_q.validate((x.astype(np.float32), y))
    with pytest.raises(InputError, match="got dtype int32"):
        small_q.quantize().run(x.astype(np.int32))
    with pytest.raises(InputError, match="label 99 but the network has 10 outputs"):
        small_q.validate((x, np.r_[y[:-1], 99]))
    with pytest.raises(InputError, match="label -1 is negative"):
        small_q.validate((x, np.r_[y[:-1], -1]))
    with pytest.raises(InputError, match="1-D array of class numbers"):
        small_q.validate((x, y + 0.5))
    # a tensor that requires grad is taken for its values
    t = torch.from_numpy(x.astype(np.float32) / 255).requires_grad_()
    assert np.array_equal(small_q.quantize().run(t), small_q.quantize().run(x))
    r = small_q.validate((t, torch.from_numpy(y).float()), metrics=["top1"])
    assert r.num_samples == 8
    for bs in (0, -1, 2.5, True):
        with pytest.raises(ArgumentError, match="batch_size: expected a positive number"):
            small_q.validate((x, y), batch_size=bs)
        with pytest.raises(ArgumentError, match="batch_size"):
            small_q.quantize().run(x, batch_size=bs)
        with pytest.raises(ArgumentError, match="batch_size"):
            Quantizer(small_net()).calibrate(x, batch_size=bs)


def test_metrics_raising_named_and_from_files(small_q, sample, tmp_path, monkeypatch):
    x, y = sample.test.images[:8], sample.test.labels[:8]
    calls = []

    def broken(scores, labels):
        calls.append(len(scores))
        raise ZeroDivisionError("oops")

    t0 = time.perf_counter()
    with pytest.raises(MetricError, match=r"metric broken: failed on scores \(4, 10\).*ZeroDivisionError: oops"):
        small_q.validate((np.repeat(x, 50, 0), np.repeat(y, 50)), metrics=["top1", broken])
    assert calls == [4] and time.perf_counter() - t0 < 5   # before the inference over 400 images
    r = small_q.validate((x, y), metrics=[lambda s, lab: 1.0, lambda s, lab: 2.0])
    assert list(r.metrics) == ["<lambda>", "<lambda> (2)"]
    assert [t.MetricOutput.iloc[0] for t in r.metrics.values()] == [1.0, 2.0]
    (tmp_path / "mymetrics.py").write_text("def half(scores, labels):\n    return 50.0\n")
    monkeypatch.chdir(tmp_path)
    r = small_q.validate((x, y), metrics=["mymetrics:half", f"{tmp_path / 'mymetrics.py'}:half", "mymetrics.py:half"])
    assert list(r.metrics) == ["half", "half (2)", "half (3)"]
    assert all(t.MetricOutput.iloc[1] == 50.0 for t in r.metrics.values())
    with pytest.raises(MetricError, match="has no 'nope'"):
        small_q.validate((x, y), metrics=["mymetrics.py:nope"])


def test_train_mode_model_is_left_in_train_mode(sample, caplog):
    net = small_net().train()
    with caplog.at_level("WARNING"):
        q = Quantizer(net)
    assert net.training and "train mode" in caplog.text
    q.calibrate(sample.train.images[:8])
    # captured in eval mode: batch norm used its running statistics
    x = sample.test.images[:4].astype(np.float32) / 255
    with torch.no_grad():
        ref = small_net().eval()(torch.from_numpy(x)).numpy()
    from netquant.ir.float_exec import run_float

    got = run_float(q.graph, torch.from_numpy(x), keep=())[q.graph.output].numpy()
    assert np.allclose(got, ref, atol=1e-4)


def test_one_channel_network_without_example(sample):
    from netquant.ir.capture import CaptureError

    with pytest.raises(CaptureError, match=r"takes 1 channel\(s\).*example=torch.rand\(1, 1, H, W\)"):
        Quantizer(small_net(channels=1))
    q = Quantizer(small_net(channels=1), example=torch.rand(2, 1, 32, 32))
    assert q.graph.input.shape == (1, 32, 32)
    with pytest.raises(Exception) as e:
        Quantizer("not a model")
    assert isinstance(e.value, NetquantError)


class FourD(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_four_d_output_is_refused_by_validate(sample):
    q = Quantizer(FourD().eval())
    q.calibrate(sample.train.images[:8])
    assert q.quantize().run(sample.test.images[:2]).shape == (2, 4, 32, 32)
    with pytest.raises(InputError, match=r"validate compares class scores \(N, classes\).*\(N, 4, 32, 32\)"):
        q.validate((sample.test.images[:8], sample.test.labels[:8]))


def test_data_errors_are_netquant_errors(tmp_path):
    from netquant.data import open_data
    from netquant.data.cifar10 import read_cifar10

    bad = tmp_path / "cifar.tar.gz"
    bad.write_bytes(b"\x1f\x8b" + os.urandom(100))
    with pytest.raises(DataError):
        read_cifar10(bad)
    with pytest.raises(NetquantError):
        open_data(str(tmp_path / "missing"))
