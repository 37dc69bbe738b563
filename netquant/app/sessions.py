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
import logging
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

from ..errors import ArgumentError, NetquantError, NotFoundError

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """A session is already running a job (HTTP 409)."""


class Full(RuntimeError):
    """The server holds as many sessions as it keeps (HTTP 429)."""


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
    validation: Optional[dict] = None   # JSON of the last validation, None once the network changed
    datasets: dict = field(default_factory=dict)  # id -> DataSet added to this session
    codegen: Optional[Path] = None      # folder of the last generated code, None once the network changed
    codegen_target: str = ""            # "c" or "cuda": what ``codegen`` holds
    codegen_built: bool = False         # compiled here (C always; CUDA when nvcc is on PATH)
    sensitivity: Optional[dict] = None  # JSON of the last sensitivity table, None once the network changed
    search: Optional[dict] = None       # JSON of the last precision search (its front and choice)
    job: Job = field(default_factory=Job)
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)  # for expiry after an idle time

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
                if isinstance(e, (NetquantError, OSError)):   # the user's to fix: the message says what
                    log.warning("session %s: %s failed: %s: %s", self.id, kind, type(e).__name__, e)
                else:                                          # a bug in netquant: its traceback
                    log.exception("session %s: %s failed (a bug in netquant)", self.id, kind)
                job.state, job.error = "error", f"{type(e).__name__}: {e}"
            job.finished = time.time()
            self.last_used = time.monotonic()

        threading.Thread(target=target, name=f"netquant-{kind}-{self.id}", daemon=True).start()

    def results_changed(self) -> bool:
        """Forget the results computed for the network as it was (after a new calibration or a
        layer choice); True if there were any, so the page can say they were cleared."""
        had = self.validation is not None or self.codegen is not None or self.sensitivity is not None
        self.validation, self.codegen, self.codegen_target, self.sensitivity = None, None, "", None
        return had


class Registry:
    """All sessions of one server. A session is created in two steps: :meth:`create` makes its
    folder (uploads land there), :meth:`register` lists it once its quantizer exists, so a failed
    import or upload never leaves a session without one. Sessions idle for ``idle_timeout``
    seconds (no request, no job running) are dropped with their files by :meth:`expire`."""

    def __init__(self, root: Optional[Path] = None, idle_timeout: float = 3600.0, max_sessions: int = 100):
        if not idle_timeout > 0:
            raise ArgumentError(f"idle_timeout must be positive seconds, got {idle_timeout!r}")
        self.root = Path(tempfile.mkdtemp(prefix="netquant-app-", dir=root))
        self.idle_timeout = float(idle_timeout)
        self.max_sessions = int(max_sessions)
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()

    def create(self) -> Session:
        """A new session, not listed yet: its folder exists, its quantizer is None."""
        self.expire()
        with self.lock:
            if len(self.sessions) >= self.max_sessions:
                raise Full(f"{len(self.sessions)} sessions are open, the most this server keeps; "
                           f"one expires after {self.idle_timeout:g} s unused")
        sid = uuid.uuid4().hex[:12]
        folder = self.root / sid
        folder.mkdir()
        return Session(sid, None, "", folder)

    def register(self, s: Session) -> Session:
        if s.quantizer is None:
            raise ValueError(f"session {s.id}: no quantizer, not registered")
        s.last_used = time.monotonic()
        with self.lock:
            self.sessions[s.id] = s
        return s

    def get(self, sid: str) -> Session:
        with self.lock:
            s = self.sessions.get(sid)
        if s is None:
            raise NotFoundError(f"no session {sid!r} (sessions unused for {self.idle_timeout:g} s expire; "
                                f"start a new one or import a saved quantizer)")
        s.last_used = time.monotonic()
        return s

    def discard(self, s: Session) -> None:
        """Forget a session (listed or not) and delete its folder."""
        with self.lock:
            self.sessions.pop(s.id, None)
        shutil.rmtree(s.folder, ignore_errors=True)

    def expire(self, now: Optional[float] = None) -> list:
        """Drop the sessions idle for longer than ``idle_timeout`` (never one running a job),
        with their files; their ids."""
        now = time.monotonic() if now is None else now
        with self.lock:
            old = [s for s in self.sessions.values()
                   if now - s.last_used > self.idle_timeout and s.job.state != "running"]
            for s in old:
                del self.sessions[s.id]
        for s in old:
            shutil.rmtree(s.folder, ignore_errors=True)
            log.info("session %s expired after %.0f s unused; its files are deleted", s.id, now - s.last_used)
        return [s.id for s in old]

    def close(self) -> None:
        with self.lock:
            self.sessions.clear()
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
    below s/2 round to zero (underflow) and values above qmax*s saturate (overflow). A bin whose
    upper edge 2^(e+1) is at most s/2 underflows whole; ``underflow_pct`` is the share of all
    values (zeros included) in those bins, the same bins the page greys, and the number the
    calibration table shows. Worked example: s = 2^-10, 16 bias values, one in the bin
    [2^-13, 2^-12): 2^-12 <= 2^-11 = s/2, so that bin underflows: 1/16 = 6.25 %."""
    from ..calib.stats import LOG2_MIN
    from ..quant import numerics as nx

    counts = stats.log2_hist.astype(np.int64)
    nz = np.nonzero(counts)[0]
    lo, hi = (int(nz[0]), int(nz[-1])) if len(nz) else (0, 0)
    lo, hi = max(0, lo - 2), min(len(counts) - 1, hi + 2)
    exps = list(range(LOG2_MIN + lo, LOG2_MIN + hi + 1))
    out = {"exponents": exps, "counts": counts[lo:hi + 1].tolist(), "zeros": int(stats.zeros),
           "total": int(stats.count), "underflow_below": None, "overflow_above": None,
           "underflow_pct": None, "overflow_pct": None}
    if scale and math.isfinite(scale) and scale > 0:
        qmax = nx.RANGES.get(dtype, nx.INT8)[1]
        under, over = math.log2(scale / 2), math.log2(qmax * scale)
        e = np.arange(LOG2_MIN, LOG2_MIN + len(counts))
        total = max(int(stats.count), 1)
        out.update(underflow_below=under, overflow_above=over,
                   underflow_pct=100.0 * float(counts[e + 1 <= under].sum()) / total,
                   overflow_pct=100.0 * float(counts[e >= over].sum()) / total)
    return out


def _precision(q, n, qn) -> str:
    """What the page's bit-width selector shows for a layer: "float", "int8" or, for a conv or
    fully connected layer with weights of 4 bits or fewer, "w4a8"; "" for layers without weights."""
    if n.op not in ("conv", "linear"):
        return ""
    if not qn.quantized:
        return "float"
    return "w4a8" if q.config.for_layer((n.name,) + n.layers).weight_bits <= 4 else "int8"


def sensitivity_json(table) -> dict:
    """The sensitivity table for the page: its rows (most harmful first) and its header numbers."""
    return {"rows": [{k: _num(v) for k, v in r.items()} for r in table.to_dict(orient="records")],
            **{k: _num(v) for k, v in table.attrs.items()}}


def search_json(result) -> dict:
    """The precision search for the page: the Pareto front, every configuration measured and the
    choice ({layer: "float" | "int8" | "w4a8"} for the layers not int8)."""
    def rows(t):
        return [{k: _num(v) for k, v in r.items()} for r in t.to_dict(orient="records")]

    explored = result.explored
    chosen = explored[explored.Chosen].iloc[0]
    return {"front": rows(result.front), "explored": rows(explored),
            "chosen": {k: _num(v) for k, v in chosen.to_dict().items()},
            **{k: _num(v) for k, v in explored.attrs.items()}}


def calibration_json(q) -> dict:
    """The calibration table for the page: one row per weight, bias and activation tensor (the
    network input itself, which is never quantized, left out), each with its histogram, and one
    entry per layer saying whether it is quantized, whether the user can change that, and why
    not. Which layers are quantized comes from the lowered network, so a layer the quantizer
    keeps in float by itself (a degenerate channel, say) shows as float with its reason."""
    from ..quant.lower import float_reasons

    table = q.calibration_table()
    ranges = q.ranges
    qg = q.quantize().qgraph
    inputs = {n.name for n in q.graph.nodes if n.op == "input"}
    rows = []
    for (_, r), s in zip(table.iterrows(), ranges):
        if s.node in inputs:
            continue
        row = {k: _num(v) for k, v in r.items()}
        row["histogram"] = h = histogram_json(s, row.get("Scale"), row.get("Type"))
        if row.get("Quantize") and h["underflow_pct"] is not None:
            row["Underflow %"] = h["underflow_pct"]  # the bins the histogram greys (see histogram_json)
        rows.append(row)
    fixed = float_reasons(q.graph, frozenset())  # float whatever the user picks
    layers = []
    for n in q.graph.nodes:
        if n.op == "input":
            continue
        qn = qg.node(n.name)
        user = n.name in q.user_float
        reason = fixed.get(n.name) or ("" if qn.quantized else (qn.reason or ("kept in float by you" if user else "")))
        layers.append({"name": n.name, "layers": list(n.layers), "op": n.op,
                       "can_quantize": n.name not in fixed and (bool(qn.quantized) or user),
                       "reason": reason, "quantized": bool(qn.quantized), "precision": _precision(q, n, qn)})
    return {"rows": rows, "layers": layers, "images": ranges.images, "source": ranges.source,
            "float_layers": sorted(q.user_float)}


PREDICTIONS = "_netquant_predictions"   # the name of the recorder's metric table, never shown


class PredictionRecorder:
    """A validation metric that keeps the predicted class of every image instead of scoring.

    ``Quantizer.validate`` calls each metric on the float scores, then on the int8 scores (after,
    perhaps, a probe on a few images), so after one validation the last two of ``runs`` are
    [float predictions, int8 predictions] of the whole set; the page's
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


def metric_unit(fn) -> str:
    """How a metric's value reads: "%" for the built-in top-1/top-5 (they return percent), else
    the function's own ``unit`` attribute ("%", "fraction" for a share in [0, 1], which the page
    shows as percent, or any label), else "" (shown as the function returns it)."""
    from ..metrics.metrics import METRICS

    if fn in METRICS.values():
        return "%"
    return str(getattr(fn, "unit", "") or "")


def validation_json(result, q, per_class: Optional[list] = None, data: Optional[DataSet] = None,
                    units: Optional[dict] = None) -> dict:
    """The page's view of a validation. ``metrics`` keeps each metric's table; ``metric_units``
    names each one's unit (:func:`metric_unit`). ``top1_difference`` is (int8 - float, 95 %
    low, high) in percentage points; with every image agreeing the bootstrap interval is
    (0, 0), which says nothing about a difference smaller than one image can show, so
    ``unseen_below`` gives the rule-of-three bound 300/N % (50 images: 6 %) under which a
    disagreement rate could go unseen."""
    fmem, qmem = q.learnable_memory()
    d, lo, hi = result.top1_difference
    n = result.num_samples
    metrics = {k: [{kk: _num(vv) for kk, vv in r.items()} for r in v.to_dict("records")]
               for k, v in result.metrics.items() if k != PREDICTIONS}
    return {"num_samples": n, "source": result.source, "metrics": metrics,
            "metric_units": {k: (units or {}).get(k, "") for k in metrics},
            "agreement": result.agreement, "top1_difference": [d, lo, hi], "mcnemar_p": _num(result.mcnemar_p),
            "unseen_below": 300.0 / n if n else None,
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
