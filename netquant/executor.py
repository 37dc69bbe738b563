"""Where many independent evaluations run: in this process, in local worker processes, or on a
Ray cluster.

The sensitivity sweep and the accuracy-budget search (:mod:`netquant.accuracy`) cut their work
into independent tasks (a batch of images through a set of network variants) and hand them to an
executor; the tables they build from the results do not depend on which executor ran them
(every task computes the same numbers wherever it runs, and the results are combined in task
order).

    with make_executor() as ex:                       # local worker processes (one per core)
        results = ex.map(task, items, shared)         # [task(shared, item) for item in items]
    with make_executor(ray_address="10.0.0.5:6379") as ex:   # a running Ray cluster
        ...

``task`` is a module-level function ``task(shared, item)``; ``shared`` (the lowered networks,
say) goes to each worker once (a worker process receives it when it starts; Ray stores it once in
its object store), ``items`` one per task. Objects travel by pickle from this process to
workers it started, never from files. Ray is the engine for clusters (``pip install ray``; every
node needs netquant installed, the same version); netquant schedules nothing itself.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, Sequence

from .errors import ArgumentError
from .progress import Progress, report

log = logging.getLogger(__name__)

Task = Callable[[Any, Any], Any]


class Executor:
    """Runs ``task(shared, item)`` for every item; :meth:`map` returns the results in item order."""

    workers = 1
    name = "in-process"

    def map(self, task: Task, items: Sequence, shared: Any = None, progress: Optional[Progress] = None,
            message: str = "") -> list:
        out = []
        for i, item in enumerate(items):
            out.append(task(shared, item))
            report(progress, i + 1, len(items), message)
        return out

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.workers} worker(s))"


InProcessExecutor = Executor


# --- local worker processes ---------------------------------------------------------------
_SHARED: Any = None


def _init_worker(shared) -> None:
    """A worker process's start: one torch thread (the processes are the parallelism) and the
    shared object of this map call."""
    global _SHARED
    _SHARED = shared
    import torch

    torch.set_num_threads(1)


def _call_in_worker(task: Task, item):
    return task(_SHARED, item)


class LocalExecutor(Executor):
    """Worker processes on this machine (``concurrent.futures``): ``workers`` of them (default:
    the cores this process may use), started per :meth:`map` call by ``context``: "fork" (the
    workers inherit ``shared`` without a copy), "forkserver" (a clean server process, with
    netquant and torch imported once, forks each worker; ``shared`` is pickled once per worker)
    or "spawn" (fresh interpreters). None, the default, picks per call: "fork" when the caller
    is the only thread, else "forkserver" (a plain fork from a program with threads, such as the
    app's server, can copy a lock another thread holds, and the worker hangs on it).
    "forkserver" and "spawn" import the caller's main module in the workers: a script needs the
    ``if __name__ == "__main__":`` guard there."""

    name = "local processes"

    def __init__(self, workers: Optional[int] = None, context: Optional[str] = None):
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ArgumentError(f"workers: expected a positive number of processes, got {workers!r}")
        self.workers = workers or available_cores()
        import multiprocessing

        methods = multiprocessing.get_all_start_methods()
        if context is not None and context not in methods:
            raise ArgumentError(f"context: expected one of {', '.join(methods)}, got {context!r}")
        self.context = context

    def _context(self):
        import multiprocessing
        import threading

        methods = multiprocessing.get_all_start_methods()
        context = self.context or ("fork" if threading.active_count() == 1 and "fork" in methods else
                                   "forkserver" if "forkserver" in methods else "spawn")
        ctx = multiprocessing.get_context(context)
        if context == "forkserver":
            # the server imports these once; each worker is then a fork of it
            ctx.set_forkserver_preload(["torch", "netquant.accuracy.variants"])
        return ctx

    def map(self, task: Task, items: Sequence, shared: Any = None, progress: Optional[Progress] = None,
            message: str = "") -> list:
        items = list(items)
        n = min(self.workers, len(items))
        if n <= 1:   # one task, or one core: starting a process gains nothing
            return super().map(task, items, shared, progress, message)
        from concurrent.futures import ProcessPoolExecutor, as_completed

        out: list = [None] * len(items)
        with ProcessPoolExecutor(n, mp_context=self._context(), initializer=_init_worker,
                                 initargs=(shared,)) as pool:
            futures = {pool.submit(_call_in_worker, task, item): i for i, item in enumerate(items)}
            try:
                for done, f in enumerate(as_completed(futures), 1):
                    out[futures[f]] = f.result()
                    report(progress, done, len(items), message)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return out


# --- Ray ----------------------------------------------------------------------------------
def _ray_call(task: Task, shared, item):
    import torch

    torch.set_num_threads(1)   # Ray gives each task one CPU
    return task(shared, item)


class RayExecutor(Executor):
    """The tasks as Ray tasks (one CPU each) on the cluster at ``address`` ("host:port" of its
    head, or "auto"; "local" starts a private one-machine cluster). Connects on creation and
    disconnects on :meth:`close` when it was the one that connected."""

    name = "ray"

    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise ArgumentError("ray_address given but Ray is not installed: pip install 'ray>=2.9' "
                                "(or install netquant[ray])") from None
        self.address = str(address)
        self._owns = not ray.is_initialized()
        if self._owns:
            try:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False,
                         include_dashboard=False if self.address == "local" else None)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise ArgumentError(f"ray_address {self.address!r}: cannot connect to a Ray cluster there ({e})") \
                    from e
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.name = f"ray {self.address}"
        log.info("Ray cluster %s: %d CPUs", self.address, self.workers)

    def map(self, task: Task, items: Sequence, shared: Any = None, progress: Optional[Progress] = None,
            message: str = "") -> list:
        import ray

        items = list(items)
        if not items:
            return []
        ref = ray.put(shared)   # stored once; each task reads it from the object store
        remote = ray.remote(num_cpus=1)(_ray_call)
        refs = [remote.remote(task, ref, item) for item in items]
        pending, done = list(refs), 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done += len(ready)
            ray.get(ready)   # a failed task raises here, not after the others
            report(progress, done, len(items), message)
        return ray.get(refs)

    def close(self) -> None:
        if self._owns:
            import ray

            ray.shutdown()
            self._owns = False


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def make_executor(workers: Optional[int] = None, ray_address: Optional[str] = None) -> Executor:
    """The executor for ``ray_address`` (a Ray cluster) or else ``workers`` local processes
    (None: one per core; 1: this process, no workers)."""
    if ray_address:
        return RayExecutor(ray_address)
    if workers == 1:
        return Executor()
    return LocalExecutor(workers)


def resolve(executor=None, workers: Optional[int] = None, ray_address: Optional[str] = None):
    """(the executor to use, whether the caller must close it): ``executor`` as given, else one
    made by :func:`make_executor`."""
    if executor is not None:
        if not isinstance(executor, Executor):
            raise ArgumentError(f"executor: expected a netquant.executor.Executor, got {type(executor).__name__}")
        return executor, False
    return make_executor(workers, ray_address), True
