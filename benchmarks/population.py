"""K sigmoid MLPs (784-500x3-10 by default) fine-tuned together as one population against
the same K models fine-tuned one after another by the Trainer, interleaved in one process.
Each model has its own init, seed (data order) and learning rate; one epoch each, batch
100, a validation pass per epoch and a test pass at the end. Prints model-samples/s (K x
training examples per second) and the population's speed-up over separate runs.

    python benchmarks/population.py [--ks 1 5 25] [--n 5000] [--width 500] [--device cpu] [--rounds 2]

With ``--pretrain rbm`` (or ``dae``) it measures one greedy layer instead: K RBMs (or denoising
autoencoders) 784->width, one epoch each, each with its own seed and lr, trained as one
population against the same K layers trained one after another.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, print_rows, row  # noqa: E402

from surgery.assembly import build_graph  # noqa: E402
from surgery.data import DataConfig, load_dataset  # noqa: E402
from surgery.finetune import (  # noqa: E402
    FinetuneConfig,
    PopulationTrainer,  # noqa: E402
    Trainer,
)
from surgery.ops import HeadOp, InsertOp  # noqa: E402
from surgery.pretrain import AEConfig, RBMConfig, train_autoencoder, train_rbm  # noqa: E402
from surgery.pretrain.autoencoder import train_autoencoder_population  # noqa: E402
from surgery.pretrain.rbm import train_rbm_population  # noqa: E402


def members(k: int, width: int, depth: int, device: str):
    sizes = (784, *([width] * depth))
    graphs, cfgs = [], []
    for i in range(k):
        layers = [InsertOp(name=f"h{j + 1}", units=b, in_features=a if j == 0 else None)
                  for j, (a, b) in enumerate(zip(sizes, sizes[1:]))]
        graphs.append(build_graph([*layers, HeadOp(classes=10)], seed=i))
        cfgs.append(FinetuneConfig(epochs=1, batch_size=100, device=device, progress=False,
                                   optimizer={"lr": 0.05 + 0.01 * i, "momentum": 0.9}))
    return graphs, cfgs


def bench(ks: list[int], n: int, width: int, depth: int, device: str, rounds: int) -> list[dict]:
    ds = load_dataset(DataConfig(limit=n, device=device))
    rows = []
    for k in ks:
        graphs, cfgs = members(k, width, depth, device)

        def sync() -> None:
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        def together(graphs=graphs, cfgs=cfgs) -> None:
            PopulationTrainer(graphs, ds, cfgs, list(range(len(graphs)))).fit()
            sync()

        def separately(graphs=graphs, cfgs=cfgs) -> None:
            for i, (g, c) in enumerate(zip(graphs, cfgs)):
                Trainer(g, ds, c, seed=i).fit()
            sync()

        med = interleaved({"population": together, "separate": separately}, rounds)
        for name, t in med.items():
            other = "separate" if name == "population" else "population"
            rows.append(row(f"K={k} {name} ({device})", k * len(ds.train) / t, None, None,
                            {other: med.ratio(name, other)}) | {"ms_per_model_epoch": round(1000 * t / k, 1)})
    return rows


def bench_pretrain(method: str, ks: list[int], n: int, width: int, device: str, rounds: int) -> list[dict]:
    x = load_dataset(DataConfig(limit=n, device=device)).train.x
    alone, together_fn = (train_rbm, train_rbm_population) if method == "rbm" else (train_autoencoder,
                                                                                   train_autoencoder_population)
    rows = []
    for k in ks:
        cfgs = [RBMConfig(hidden=width, epochs=1, lr=0.05 + 0.01 * i, momentum=0.5) if method == "rbm"
                else AEConfig(method="dae", hidden=width, epochs=1, lr=0.01 + 0.001 * i) for i in range(k)]

        def sync() -> None:
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        def together(cfgs=cfgs) -> None:
            gens = [torch.Generator().manual_seed(i) for i in range(len(cfgs))]
            together_fn([x] * len(cfgs), cfgs, ["h1"] * len(cfgs), 100, gens, False)
            sync()

        def separately(cfgs=cfgs) -> None:
            for i, c in enumerate(cfgs):
                alone(x, c, "h1", 100, torch.Generator().manual_seed(i), False)
            sync()

        med = interleaved({"population": together, "separate": separately}, rounds)
        for name, t in med.items():
            other = "separate" if name == "population" else "population"
            rows.append(row(f"{method} K={k} {name} ({device})", k * n / t, None, None,
                            {other: med.ratio(name, other)}) | {"ms_per_model_epoch": round(1000 * t / k, 1)})
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5, 25])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pretrain", choices=["rbm", "dae"], help="measure one pretraining layer instead of fine-tuning")
    a = ap.parse_args()
    if a.pretrain:
        print_rows(bench_pretrain(a.pretrain, a.ks, a.n, a.width, a.device, a.rounds))
    else:
        print_rows(bench(a.ks, a.n, a.width, a.depth, a.device, a.rounds))
