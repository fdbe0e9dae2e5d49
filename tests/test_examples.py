import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "stacking.py": ["--dataset", "synthetic", "--limit", "300", "--epochs", "1"],
    "surgery_ops.py": [],
    "own_data.py": ["--n", "600", "--epochs", "2"],
    "finetuning.py": ["--dataset", "synthetic", "--limit", "300", "--epochs", "1"],
    "experiment.py": ["--dataset", "synthetic", "--limit", "300", "--epochs", "1", "--pretrain-epochs", "1",
                      "--seeds", "2"],
}
EXPECT = {"experiment.py": "the same network",  # a population member equals the same net trained alone
          "own_data.py": "from tensors: an RBM-pretrained 144-64-5 net"}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script, tmp_path):
    args = CASES[script]
    if "--limit" in args:
        args = [*args, "--out", str(tmp_path)]
    p = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip()
    assert EXPECT.get(script, "") in p.stdout, p.stdout[-2000:]


def test_examples_are_all_tested():
    assert {p.name for p in (ROOT / "examples").glob("*.py")} == set(CASES)


def test_the_readme_python_example_runs_as_written(tmp_path):
    """The README's Python API block, run as a user would paste it (MNIST, 5000 examples):
    it runs, and what it prints is a test error a pretrained net reaches (the README says
    7.06%)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "S.Trainer(" in code and "print(result" in code
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert 3.0 < float(p.stdout.strip().splitlines()[-1]) < 10.0, p.stdout
