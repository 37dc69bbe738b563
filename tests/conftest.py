"""Shared fixtures. Tests use the real CIFAR-10 (``$NETQUANT_DATA``, else ../shared/data)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar-10-binary.tar.gz"


def real_data_path() -> Path | None:
    env = os.environ.get("NETQUANT_DATA")
    if env and env not in ("sample", "download"):
        return Path(env)
    return SHARED_ARCHIVE if SHARED_ARCHIVE.exists() else None


@pytest.fixture(scope="session")
def cifar_path() -> Path:
    path = real_data_path()
    if path is None or not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the real CIFAR-10: set NETQUANT_DATA (looked at {SHARED_ARCHIVE})")
        pytest.skip("real CIFAR-10 not found; set NETQUANT_DATA")
    return path


@pytest.fixture(scope="session")
def cifar(cifar_path):
    from netquant.data import read_cifar10

    return read_cifar10(cifar_path)


@pytest.fixture(scope="session")
def resnet20_quantizer(cifar):
    """The shipped ResNet-20 calibrated on MATLAB's default 200 random training images, target
    "gpu": made once per session and shared, so never changed by a test (a test that changes
    the config or the layer choices works on :func:`fresh_copy`)."""
    from netquant.data import calibration_set
    from netquant.models.pretrained import load_pretrained
    from netquant.quantizer import Quantizer

    q = Quantizer(load_pretrained("cifarnet-20-16"))
    q.calibrate(calibration_set(cifar))
    return q


def fresh_copy(q):
    """A quantizer of its own that starts where ``q`` is (graph, statistics, config and layer
    choices shared: they are immutable or replaced, never changed in place; provenance copied):
    set_config, set_quantize and calibrate on it leave ``q`` as it was."""
    import copy

    c = copy.copy(q)
    c.provenance = copy.deepcopy(q.provenance)
    return c


@pytest.fixture(scope="session")
def arch_net(cifar):
    """``arch_net(name)``: (model, quantizer) for a network class of tests/test_architectures.py,
    trained there for a few seconds on real CIFAR-10 and calibrated on 200 training images, once
    per session (test_architectures and test_codegen_c share them). Never changed by a test:
    capture restores the module's mode, and a test that changes the quantizer takes a fresh_copy."""
    import test_architectures as arch

    made = {}

    def get(name: str):
        if name not in made:
            model = arch.build(getattr(arch, name), cifar, **arch.TRAINING.get(name, {}))
            made[name] = model, arch.calibrated(model, cifar)
        return made[name]

    return get


# --- running on several cores (pytest-xdist; pyproject's addopts start one worker per core) -------
# A file runs whole on one worker, so its module fixtures are made once; files that share the
# session's trained networks (arch_net) or the browser run on the same worker; the files that take
# longest start first, so that the workers finish together (measured 2026-12-03 under the full
# suite: test_codegen_c + test_architectures 300 s, test_search 200 s, test_codegen_arm 125 s, ...).
SAME_WORKER = {"test_architectures.py": "arch_net", "test_codegen_c.py": "arch_net",
               "test_app_browser.py": "browser", "test_app_search.py": "browser"}
LONGEST_FIRST = ("test_codegen_c.py", "test_architectures.py", "test_search.py", "test_codegen_arm.py",
                 "test_codegen_cuda.py", "test_app_browser.py", "test_app_search.py", "test_int4.py",
                 "test_app_server.py", "test_acceptance.py", "test_codegen_scale.py", "test_onnx_import.py",
                 "test_accuracy_tools.py", "test_cli.py", "test_onnx.py", "test_codegen_imagenet.py",
                 "test_engine_c.py", "test_codegen_float.py")


def pytest_configure(config):
    """A worker's share of the cores: with two workers each running torch, OpenMP and the
    generated libraries on every core, the cores are oversubscribed and OpenMP's spin-waiting
    made torch's kernels up to 10x slower (measured 2026-12-03, 2-core Zen 3). Set before torch
    is imported (test modules import it at collection); subprocesses inherit it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        if "torch" in sys.modules:   # imported by a plugin: set the pool it already made
            sys.modules["torch"].set_num_threads(share)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: a file keeps its order


def pytest_xdist_make_scheduler(config, log):
    """Whole files (and the SAME_WORKER groups) to one worker each, in collection order. Our own
    scheduler, not ``--dist loadgroup``: xdist 3.8 marks a group by rewriting ``item._nodeid``,
    which pytest 9.2's nodes no longer read, so the marks were silently ignored and the tests of
    one file (and the module fixtures they share: trained networks, AdaRound, the browser) were
    spread over both workers and made twice (found 2026-12-03)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByFileGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
            return SAME_WORKER.get(name, name)

    return ByFileGroup(config, log)
