"""bench/gpu_check.py runs where a GPU is lent for minutes, now and then: its dry run (the CUDA
sources built for the CPU emulation, PyTorch on the CPU) must go through every step here."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow   # ~40 s: two ResNet-20 libraries emulated on 8 images and batches 1 and 4
def test_the_gpu_check_runs_through_without_a_gpu(cifar_path, tmp_path):
    log = tmp_path / "gpu-check.txt"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-dry-run", "--skip-resnet50",
                        "--data", str(cifar_path), "--log", str(log)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = log.read_text()
    assert "CPU DRY RUN" in out.splitlines()[0] and out.splitlines()[0] in r.stdout   # --log holds what was printed
    for v in ("dp4a", "mma"):
        assert f"[{v}] bit-exact with the reference executor on 8 images" in out and f"[{v}] FAILED" not in out
    assert out.count(": True;") == 2
    table = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["4"])]
    assert len(table) == 2 and all(len(row) == 10 and row[5] == "nan" for row in table), table
