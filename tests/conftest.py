"""Shared fixtures. Tests use the real CIFAR-10 (``$NETQUANT_DATA``, else ../shared/data)."""
import os
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
