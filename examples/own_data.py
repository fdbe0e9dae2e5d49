"""Your own data, two ways: numpy arrays saved as one .npz file that a recipe reads
(``data: {dataset: arrays, path: ...}``), and the same arrays as tensors handed straight to
the Python API.

The arrays here stand in for yours: noisy binary images of a few classes, each class a
fixed pattern of pixel probabilities. Part 1 saves them with ``np.savez`` and runs a small
grid (no pretraining against RBM pretraining, depths 1 and 2) from a recipe that names the
file. Part 2 builds an ``S.Dataset`` from tensors and fine-tunes one RBM-pretrained net.

    python examples/own_data.py [--n 3000] [--classes 5] [--epochs 8] [--out runs/examples/own_data]
"""

import argparse
from pathlib import Path

import numpy as np
import torch

import surgery as S

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=3000, help="training examples (valid and test: a fifth as many each)")
ap.add_argument("--classes", type=int, default=5)
ap.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs (pretraining: the same per layer)")
ap.add_argument("--out", type=Path, default=Path("runs/examples/own_data"))
args = ap.parse_args()

# Stand-in data: 12x12 binary (0/1) images, each class a fixed pattern of pixel probabilities.
rng = np.random.default_rng(0)
base = rng.random((12, 12))  # the classes share most of their pattern: not too easy
patterns = np.clip(base + 0.12 * rng.standard_normal((args.classes, 12, 12)), 0.02, 0.98)
arrays = {}
for split, n in (("train", args.n), ("valid", args.n // 5), ("test", args.n // 5)):
    y = rng.integers(0, args.classes, n)
    arrays[f"x_{split}"] = (rng.random((n, 12, 12)) < patterns[y]).astype(np.uint8)  # [N, H, W]
    arrays[f"y_{split}"] = y  # class numbers 0 .. classes-1
args.out.mkdir(parents=True, exist_ok=True)
np.savez(args.out / "mine.npz", **arrays)  # what `surgery inspect mine.npz` describes

# Part 1: a recipe that reads the file (a relative path is relative to base_dir, as to a recipe file's folder).
recipe = S.recipe_from_dict({
    "name": "own-data",
    "data": {"dataset": "arrays", "path": "mine.npz"},  # x_valid/y_valid in the file: its validation split
    "experiment": {"conditions": ["none", "rbm"], "depths": [1, 2], "seeds": [0, 1], "hidden": 64,
                   "pretrain_epochs": args.epochs, "methods": {"rbm": {"lr": 0.1, "momentum": 0.5}}},
    "finetune": {"epochs": args.epochs, "batch_size": 50, "progress": False,
                 "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
}, base_dir=args.out)
rows = S.run_experiment(recipe, args.out / "grid", progress=False)
S.write_report(args.out / "grid", rows)
print("\n".join(S.summary_grid(rows)))

# Part 2: the same arrays as tensors, no file: float32 examples, int64 labels.
def split(name: str) -> S.Split:
    return S.Split(torch.from_numpy(arrays[f"x_{name}"].reshape(-1, 144)).float(),
                   torch.from_numpy(arrays[f"y_{name}"]).long())


data = S.Dataset("mine", split("train"), split("valid"), split("test"))
stack = S.greedy_pretrain(data.train.x, S.PretrainConfig(layers=[{"method": "rbm", "hidden": 64,
                                                                  "epochs": args.epochs, "lr": 0.05}]),
                          progress=False)
graph = S.build_graph([S.TakeOp(source="rbm"), S.HeadOp(classes=data.num_classes)], {"rbm": stack})
result = S.Trainer(graph, data, S.FinetuneConfig(epochs=args.epochs, batch_size=50, progress=False)).fit()
print(f"from tensors: an RBM-pretrained 144-64-{data.num_classes} net, test error {result['test_error']:.2f}%")
