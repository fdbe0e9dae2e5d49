"""Forward cost of a compiled ModelGraph vs a hand-written nn.Sequential of the same
layers (784-1000x3-10 sigmoid, batch 1000, inference), interleaved; target within 3%.

    python benchmarks/forward.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, print_rows, row  # noqa: E402
from finetune import SIZES, assembled  # noqa: E402

from surgery.modules import to_module  # noqa: E402


def bench(rounds: int, batch: int = 1000, iters: int = 20) -> list[dict]:
    compiled = to_module(assembled()).eval()
    layers: list[nn.Module] = []
    for a, b in zip(SIZES, SIZES[1:]):
        layers += [nn.Linear(a, b), nn.Sigmoid()]
    hand = nn.Sequential(*layers, nn.Linear(SIZES[-1], 10)).eval()
    x = torch.rand(batch, SIZES[0])

    def run(m: nn.Module) -> None:
        with torch.no_grad():
            for _ in range(iters):
                m(x)

    med = interleaved({"graph": lambda: run(compiled), "nn_sequential": lambda: run(hand)}, rounds)
    params = sum(a * b for a, b in zip(SIZES, SIZES[1:])) + SIZES[-1] * 10
    return [row(f"forward b{batch} {k}", batch * iters / t, 2 * params, None,
                {p: med.ratio(k, p) for p in med if p != k})
            for k, t in med.items()]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    print_rows(bench(ap.parse_args().rounds))
