"""Shared timing helpers: interleaved rounds, medians, the machine's matmul peak."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timeit(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Timings(dict):
    """Median seconds per call of each contender (``timings[name]``), with every round's
    times kept (``timings.rounds``) for paired ratios."""

    def __init__(self, rounds: dict[str, list[float]]):
        super().__init__({k: statistics.median(v) for k, v in rounds.items()})
        self.rounds = rounds

    def ratio(self, k: str, peer: str) -> float:
        """How many times faster ``k`` is than ``peer``: the median over rounds of
        ``t_peer / t_k`` within the same round. The machine's speed drifts by 20-30%
        between minutes; a round's contenders run back to back, so their ratio does not."""
        return statistics.median(p / t for p, t in zip(self.rounds[peer], self.rounds[k]))


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> Timings:
    """Time each contender once per round, in turn, after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, fn in contenders.items():
            times[k].append(timeit(fn))
    return Timings(times)


def matmul_peak(n: int = 4096, reps: int = 3, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Achieved GFLOP/s of an n x n x n matmul (median of ``reps``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def run() -> None:
        torch.mm(a, b, out=c)
        if device != "cpu":
            torch.cuda.synchronize()

    run()
    return 2 * n**3 / statistics.median(timeit(run) for _ in range(reps)) / 1e9


def mnist_train(n: int | None = None, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    from surgery.data import DataConfig, load_dataset

    ds = load_dataset(DataConfig(limit=n, device=device))
    return ds.train.x, ds.train.y


def row(name: str, samples_per_s: float, flops_per_sample: float | None, peak: float | None,
        ratios: dict[str, float] | None = None) -> dict:
    r = {"name": name, "samples_per_s": round(samples_per_s, 1)}
    if flops_per_sample:
        gf = samples_per_s * flops_per_sample / 1e9
        r["gflops"] = round(gf, 1)
        if peak:
            r["frac_peak"] = round(gf / peak, 3)
    for k, v in (ratios or {}).items():
        r[f"x_{k}"] = round(v, 3)
    return r


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        extra = "  ".join(f"{k}={v}" for k, v in r.items() if k not in ("name", "samples_per_s"))
        print(f"{r['name']:<34} {r['samples_per_s']:>12,.0f} samples/s  {extra}")
