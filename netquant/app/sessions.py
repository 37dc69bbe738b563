"""Sessions of the Deep Network Quantizer app: one quantizer each, its long jobs run off the
request thread, its files in its own temporary folder.

A :class:`Session` holds a Quantizer, the data sets added to it (:class:`DataSet`: images already
resized to the network's input) and the results shown on the pages. Long work (calibration,
validation, code generation) runs in a thread per job; a session runs one job at a time and
reports progress through :class:`Job`. Sessions are independent: each has its own lock, data
sets and folder, so several tabs and several sessions at once don't touch each other's state.
"""
from __future__ import annotations

import io
import math
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np


class Busy(RuntimeError):
    """A session is already running a job."""


@dataclass(frozen=True)
class DataSet:
    """A data set a session can calibrate or validate on: two ImageSets of the network's input
    shape (for one uploaded set, ``train`` and ``test`` are the same set) and the class names
    (label i is ``class_names[i]``), if known."""

    id: str                               # "cifar10", or "data1", "data2", ... per session
    name: str                             # what the page shows: the file or folder name
    train: object                         # ImageSet calibration draws from
    test: object                          # ImageSet validation draws from
    class_names: Optional[tuple] = None

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "train": len(self.train), "test": len(self.test),
                "same": self.train is self.test, "shape": list(self.test.images.shape[1:]),
                "class_names": list(self.class_names) if self.class_names else None,
                "source": self.test.source}

    def class_name(self, label: int) -> str:
        names = self.class_names or ()
        return str(names[label]) if 0 <= label < len(names) else f"class {label}"


@dataclass
class Job:
    """Progress of the long work of one session."""

    kind: str = ""
    state: str = "idle"          # idle, running, done, error
    done: int = 0
    total: int = 0
    message: str = ""
    error: str = ""
    started: float = 0.0
    finished: float = 0.0

    def to_json(self) -> dict:
        return {"kind": self.kind, "state": self.state, "done": self.done, "total": self.total,
                "message": self.message, "error": self.error,
                "seconds": round((self.finished or time.time()) - self.started, 1) if self.started else 0}


@dataclass
class Session:
    id: str
    quantizer: object
    network: str
    folder: Path
    data: object = None                 # Cifar10 (shared, read-only)
    calibration_images: object = None   # the ImageSet or array calibrated on
    validation: Optional[dict] = None   # JSON of the last validation
    datasets: dict = field(default_factory=dict)  # id -> DataSet added to this session
    codegen: Optional[Path] = None      # folder of the last generated code
    job: Job = field(default_factory=Job)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, kind: str, work: Callable[[Callable], None]) -> None:
        """Start ``work(progress)`` in a thread; Busy if a job is running."""
        with self.lock:
            if self.job.state == "running":
                raise Busy(f"session {self.id} is busy: {self.job.kind} is running")
            self.job = Job(kind, "running", started=time.time(), message="starting")
        job = self.job

        def progress(done, total, message=""):
            job.done, job.total, job.message = done, total, message

        def target():
            try:
                work(progress)
                job.state = "done"
            except Exception as e:  # reported to the page, never lost
                job.state, job.error = "error", f"{type(e).__name__}: {e}"
            job.finished = time.time()

        threading.Thread(target=target, name=f"netquant-{kind}-{self.id}", daemon=True).start()


class Registry:
    """All sessions of one server."""

    def __init__(self, root: Optional[Path] = None):
        self.root = Path(tempfile.mkdtemp(prefix="netquant-app-", dir=root))
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()

    def create(self, quantizer, network: str, data) -> Session:
        sid = uuid.uuid4().hex[:12]
        folder = self.root / sid
        folder.mkdir()
        s = Session(sid, quantizer, network, folder, data)
        with self.lock:
            self.sessions[sid] = s
        return s

    def get(self, sid: str) -> Session:
        with self.lock:
            s = self.sessions.get(sid)
        if s is None:
            raise KeyError(f"no session {sid!r}")
        return s

    def discard(self, sid: str) -> None:
        """Forget a session whose creation failed, with its folder."""
        with self.lock:
            s = self.sessions.pop(sid, None)
        if s is not None:
            shutil.rmtree(s.folder, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# --- what the pages show ------------------------------------------------------------------------

def _num(v):
    """JSON-safe numbers (NaN and inf become None)."""
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def histogram_json(stats, scale: Optional[float], dtype: str) -> dict:
    """The log2-magnitude histogram of one tensor and which bins the integer type represents.

    Bin e holds the values with 2^e <= |x| < 2^(e+1). With scale s and qmax (127 or 255), values
    below s/2 round to zero (underflow) and values above qmax*s saturate (overflow)."""
    from ..calib.stats import LOG2_MIN

    counts = stats.log2_hist.astype(np.int64)
    nz = np.nonzero(counts)[0]
    lo, hi = (int(nz[0]), int(nz[-1])) if len(nz) else (0, 0)
    lo, hi = max(0, lo - 2), min(len(counts) - 1, hi + 2)
    exps = list(range(LOG2_MIN + lo, LOG2_MIN + hi + 1))
    out = {"exponents": exps, "counts": counts[lo:hi + 1].tolist(), "zeros": int(stats.zeros),
           "total": int(stats.count), "underflow_below": None, "overflow_above": None}
    if scale and math.isfinite(scale):
        qmax = {"int8": 127, "uint8": 255, "int32": 2 ** 31 - 1}.get(dtype, 127)
        out["underflow_below"] = math.log2(scale / 2)
        out["overflow_above"] = math.log2(qmax * scale)
    return out


def calibration_json(q) -> dict:
    table = q.calibration_table()
    ranges = q.ranges
    rows = []
    for (_, r), s in zip(table.iterrows(), ranges):
        row = {k: _num(v) for k, v in r.items()}
        row["histogram"] = histogram_json(s, row.get("Scale"), row.get("Type"))
        rows.append(row)
    reasons = {}
    from ..quant.lower import float_reasons

    for node, why in float_reasons(q.graph, frozenset()).items():
        reasons[node] = why
    layers = [{"name": n.name, "layers": list(n.layers), "op": n.op, "can_quantize": n.name not in reasons,
               "reason": reasons.get(n.name, ""), "quantized": n.name not in q.user_float and n.name not in reasons}
              for n in q.graph.nodes if n.op != "input"]
    return {"rows": rows, "layers": layers, "images": ranges.images, "source": ranges.source}


PREDICTIONS = "_netquant_predictions"   # the name of the recorder's metric table, never shown


class PredictionRecorder:
    """A validation metric that keeps the predicted class of every image instead of scoring.

    ``Quantizer.validate`` calls each metric on the float scores, then on the int8 scores, so
    after one validation ``runs`` holds [float predictions, int8 predictions]; the page's
    per-class table comes from them without running the network a second time. Its table is
    left out of the metrics shown (:func:`validation_json`)."""

    def __init__(self):
        self.__name__ = PREDICTIONS     # Quantizer.validate names each metric table by __name__
        self.runs: list = []

    def __call__(self, scores, labels) -> float:
        self.runs.append(np.asarray(scores).argmax(1))
        return 0.0


def per_class_json(labels: np.ndarray, float_pred: np.ndarray, int8_pred: np.ndarray, data: DataSet) -> list:
    """One row per class present in ``labels``: its name, how many images, the float and int8
    top-1 (%) on them, and on how many of them float and int8 predict different classes.

    Worked example: 4 images of class 3 ("cat"), float right on 3, int8 right on 2 and the
    two differing on 1 image: {"Class": 3, "Name": "cat", "Images": 4, "Float top-1 %": 75.0,
    "Int8 top-1 %": 50.0, "Changed": 1}."""
    rows = []
    for c in np.unique(labels):
        m = labels == c
        rows.append({"Class": int(c), "Name": data.class_name(int(c)), "Images": int(m.sum()),
                     "Float top-1 %": 100.0 * float((float_pred[m] == c).mean()),
                     "Int8 top-1 %": 100.0 * float((int8_pred[m] == c).mean()),
                     "Changed": int((float_pred[m] != int8_pred[m]).sum())})
    return rows


def validation_json(result, q, per_class: Optional[list] = None, data: Optional[DataSet] = None) -> dict:
    fmem, qmem = q.learnable_memory()
    d, lo, hi = result.top1_difference
    return {"num_samples": result.num_samples, "source": result.source,
            "metrics": {k: [{kk: _num(vv) for kk, vv in r.items()} for r in v.to_dict("records")]
                        for k, v in result.metrics.items() if k != PREDICTIONS},
            "agreement": result.agreement, "top1_difference": [d, lo, hi], "mcnemar_p": result.mcnemar_p,
            "memory": {"float": fmem, "quantized": qmem, "reduction": 100 * (1 - qmem / fmem)},
            "layer_errors": [{k: _num(v) for k, v in r.items()} for r in result.layer_errors.to_dict("records")],
            "data": data.to_json() if data is not None else None, "per_class": per_class or []}


def zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and ".build" not in p.parts:
                z.write(p, p.relative_to(folder))
    return buf.getvalue()
