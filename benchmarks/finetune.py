"""Fine-tuning throughput of an assembled 784-1000-1000-1000-10 sigmoid network (SGD with
momentum, batch 100, cross-entropy, a validation pass per epoch and a test pass at the
end) against a hand-written plain PyTorch loop doing the same work on the same data,
interleaved in one process. On CUDA, `surgery` captures the step as a CUDA graph
(``cuda_graph: auto``) and `surgery_eager` is the same Trainer without it.

    python benchmarks/finetune.py [--rounds 3] [--n 50000] [--epochs 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, matmul_peak, print_rows, row  # noqa: E402

from surgery.assembly import build_graph  # noqa: E402
from surgery.data import DataConfig, load_dataset  # noqa: E402
from surgery.finetune import FinetuneConfig, Trainer  # noqa: E402
from surgery.graph import ModelGraph  # noqa: E402
from surgery.ops import HeadOp, InsertOp  # noqa: E402

SIZES = (784, 1000, 1000, 1000)


def assembled() -> ModelGraph:
    layers = [InsertOp(name=f"h{i + 1}", units=b, in_features=a if i == 0 else None)
              for i, (a, b) in enumerate(zip(SIZES, SIZES[1:]))]
    return build_graph([*layers, HeadOp(classes=10)], seed=0)


def plain_loop(ds, epochs: int, batch: int, device: torch.device, amp: bool = False) -> float:
    layers: list[nn.Module] = []
    for a, b in zip(SIZES, SIZES[1:]):
        layers += [nn.Linear(a, b), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(SIZES[-1], 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = ds.train.x, ds.train.y
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g).to(device)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x[idx]).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            float((model(ds.valid.x).argmax(1) != ds.valid.y).float().mean())
    with torch.no_grad():
        return float((model(ds.test.x).argmax(1) != ds.test.y).float().mean())


def ours(ds, epochs: int, batch: int, device: str, amp: bool = False, compile: bool = False,
         cuda_graph: bool | str = "auto") -> float:
    cfg = FinetuneConfig(epochs=epochs, batch_size=batch, device=device, progress=False, amp=amp, compile=compile,
                         cuda_graph=cuda_graph, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9})
    return Trainer(assembled(), ds, cfg).fit()["test_error"]


def bench(n: int | None, epochs: int, rounds: int, device: str, peak: float | None, batch: int = 100,
          amp: bool = False) -> list[dict]:
    ds = load_dataset(DataConfig(limit=n, device=device))
    dev = ds.device

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    contenders = {
        "surgery": lambda: (ours(ds, epochs, batch, device, amp), sync()),
        "plain_torch": lambda: (plain_loop(ds, epochs, batch, dev, amp), sync()),
    }
    if dev.type == "cuda":  # "surgery" captures the step as a CUDA graph there; this one does not
        contenders["surgery_eager"] = lambda: (ours(ds, epochs, batch, device, amp, cuda_graph=False), sync())
    med = interleaved(contenders, rounds)
    N = len(ds.train) * epochs
    params = sum(a * b for a, b in zip(SIZES, SIZES[1:])) + SIZES[-1] * 10
    # The matmul work per training example: forward 2 and backward 4 flops per weight,
    # less the first layer's input gradient (the data needs none), plus the validation
    # pass each epoch and the test pass at the end (2 flops per weight per example each).
    flops = 6 * params - 2 * SIZES[0] * SIZES[1] + 2 * params * (len(ds.valid) + len(ds.test) / epochs) / len(ds.train)
    return [row(f"finetune 784-1000x3-10 b{batch} {k} ({device})", N / t, flops, peak,
                {p: med.ratio(k, p) for p in med if p != k}) | {"seconds_per_epoch": round(t / epochs, 3)}
            for k, t in med.items()]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true")
    a = ap.parse_args()
    peak = matmul_peak(device="cuda" if a.device.startswith("cuda") else "cpu")
    print(f"matmul peak: {peak:.1f} GFLOP/s")
    print_rows(bench(a.n, a.epochs, a.rounds, a.device, peak, a.batch, a.amp))
