"""Greedy layer-wise pretraining with the Python API: an RBM, then a denoising
autoencoder on the RBM's features; save the stack and read it back.

    python examples/stacking.py [--limit 2000] [--epochs 2] [--out runs/examples]
"""

import argparse
from pathlib import Path

import surgery as S
from surgery.weights_io import describe

ap = argparse.ArgumentParser()
ap.add_argument("--dataset", default="mnist")
ap.add_argument("--limit", type=int, default=2000)
ap.add_argument("--epochs", type=int, default=2)
ap.add_argument("--out", type=Path, default=Path("runs/examples"))
args = ap.parse_args()

data = S.load_dataset(S.DataConfig(dataset=args.dataset, limit=args.limit))
cfg = S.PretrainConfig(layers=[
    {"method": "rbm", "hidden": 256, "epochs": args.epochs, "lr": 0.05},
    {"method": "dae", "hidden": 128, "epochs": args.epochs, "noise": 0.3},
])
stack = S.greedy_pretrain(data.train.x, cfg, seed=0, data_fingerprint=data.fingerprint())
path = stack.save(args.out / "stack.safetensors")
back = S.LayerStack.load(path)
print(describe(back.manifest()))
print("features:", tuple(back.transform(data.test.x[:5]).shape))
