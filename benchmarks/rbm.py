"""Bernoulli RBM 784->500, CD-1, batch 100, one epoch on the 50k MNIST training set:
surgery's trainer vs a hand-written plain torch CD-1 loop vs scikit-learn's BernoulliRBM
(float32 input), interleaved in one process; prints samples/s and ratios. On CUDA our step
is replayed from a CUDA graph, and `surgery_eager` is the same trainer without it.

    python benchmarks/rbm.py [--rounds 3] [--n 50000] [--hidden 500] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, matmul_peak, mnist_train, print_rows, row  # noqa: E402

from surgery.pretrain import RBMConfig  # noqa: E402
from surgery.pretrain.rbm import train_rbm_population  # noqa: E402


def plain_torch_cd1(x: torch.Tensor, hidden: int, lr: float = 0.05, batch: int = 100, seed: int = 0) -> torch.Tensor:
    """The loop a user would write: CD-1 with torch.bernoulli, two outer products."""
    g = torch.Generator().manual_seed(seed)
    dev = x.device
    W = (torch.randn(x.shape[1], hidden, generator=g) * 0.01).to(dev)
    b = torch.zeros(x.shape[1], device=dev)
    c = torch.zeros(hidden, device=dev)
    perm = torch.randperm(x.shape[0], generator=g).to(dev)
    gb = g if dev.type == "cpu" else None
    for i in range(0, x.shape[0], batch):
        v0 = x[perm[i : i + batch]]
        ph0 = torch.sigmoid(v0 @ W + c)
        h0 = torch.bernoulli(ph0, generator=gb)
        pv1 = torch.sigmoid(h0 @ W.t() + b)
        ph1 = torch.sigmoid(pv1 @ W + c)
        W += lr * (v0.t() @ ph0 - pv1.t() @ ph1) / v0.shape[0]
        b += lr * (v0 - pv1).mean(0)
        c += lr * (ph0 - ph1).mean(0)
    return W


def ours(x: torch.Tensor, hidden: int, persistent: bool = False, capture: bool = True) -> None:
    train_rbm_population([x], [RBMConfig(hidden=hidden, epochs=1, lr=0.05, persistent=persistent)], ["h1"], 100,
                         [torch.Generator().manual_seed(0)], progress=False, capture=capture)


def sklearn_rbm(xn, hidden: int) -> None:
    from sklearn.neural_network import BernoulliRBM

    BernoulliRBM(n_components=hidden, learning_rate=0.05, batch_size=100, n_iter=1, random_state=0).fit(xn)


def bench(n: int | None, hidden: int, rounds: int, peak: float | None, device: str = "cpu") -> list[dict]:
    x, _ = mnist_train(n, device=device)

    def sync() -> None:
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    contenders = {
        "surgery": lambda: (ours(x, hidden), sync()),
        "surgery_pcd": lambda: (ours(x, hidden, persistent=True), sync()),
        "plain_torch": lambda: (plain_torch_cd1(x, hidden), sync()),
    }
    if x.device.type == "cuda":  # the same step without the CUDA graph
        contenders["surgery_eager"] = lambda: (ours(x, hidden, capture=False), sync())
    if x.device.type == "cpu":  # the peers below are CPU libraries here
        xn = x.numpy()
        try:
            import sklearn  # noqa: F401

            contenders["sklearn"] = lambda: sklearn_rbm(xn, hidden)
        except ImportError:
            print("scikit-learn is not installed (pip install -e '.[bench]'); skipping it", file=sys.stderr)
        try:
            import learnergy  # noqa: F401
            from learnergy.models.bernoulli import RBM as LRBM  # type: ignore

            ds = torch.utils.data.TensorDataset(x, torch.zeros(len(x)))
            contenders["learnergy"] = lambda: LRBM(n_visible=x.shape[1], n_hidden=hidden, steps=1,
                                                    learning_rate=0.05).fit(ds, batch_size=100, epochs=1)
        except ImportError:
            pass
    med = interleaved(contenders, rounds)
    N = x.shape[0]
    flops = 10 * x.shape[1] * hidden  # 3 forward matmuls + 2 gradient outer products
    rows = []
    for k, t in med.items():
        both_ours = k.startswith("surgery")
        ratios = {p: med.ratio(k, p) for p in med
                  if p != k and not (both_ours and p.startswith("surgery") and "surgery_eager" not in (k, p))}
        rows.append(row(f"rbm cd1 784->{hidden} {k} ({device})", N / t, flops, peak, ratios))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=None, help="training examples (default all 50k)")
    ap.add_argument("--hidden", type=int, default=500)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (our RBM and the plain loop only)")
    a = ap.parse_args()
    peak = matmul_peak(device="cuda" if a.device.startswith("cuda") else "cpu")
    print(f"matmul peak (4096^3 float32, {torch.get_num_threads()} threads): {peak:.1f} GFLOP/s")
    print_rows(bench(a.n, a.hidden, a.rounds, peak, a.device))
