"""All benchmarks in one run, side by side on the same data, interleaved rounds, medians:

  RBM CD-1 and PCD-1 784->500 (vs a plain torch loop, scikit-learn's BernoulliRBM,
  learnergy when installed), DAE and sparse AE 784->1000 (vs a plain torch DAE loop),
  greedy 3-layer stacking, fine-tuning 784-1000x3-10 (vs a plain torch loop), stack
  save/load (vs raw safetensors; its load maps the file lazily, so the raw baseline reads
  every value once, as any use of the weights does), graph forward (vs nn.Sequential).

Prints samples/s, achieved GFLOP/s, the fraction of this machine's measured matmul peak
and the ratio to each peer.

    python benchmarks/run.py [--quick] [--json] [--device cpu|cuda] [--rounds R] [--n N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune as ft_bench  # noqa: E402
import forward as fw_bench  # noqa: E402
import rbm as rbm_bench  # noqa: E402
from common import interleaved, matmul_peak, mnist_train, print_rows, row  # noqa: E402

from surgery.errors import SurgeryWarning  # noqa: E402
from surgery.pretrain import AEConfig, PretrainConfig, greedy_pretrain, train_autoencoder  # noqa: E402


def plain_dae(x: torch.Tensor, hidden: int, noise: float = 0.25, lr: float = 0.01, batch: int = 100) -> None:
    """A hand-written tied denoising autoencoder loop (autograd + torch.optim.SGD)."""
    g = torch.Generator().manual_seed(0)
    nv = x.shape[1]
    W = (torch.rand(hidden, nv, generator=g) * 2 - 1).mul_(4 * (6 / (nv + hidden)) ** 0.5).to(x.device).requires_grad_()
    b = torch.zeros(nv, device=x.device, requires_grad=True)
    c = torch.zeros(hidden, device=x.device, requires_grad=True)
    opt = torch.optim.SGD([W, b, c], lr=lr, momentum=0.9)
    perm = torch.randperm(len(x), generator=g).to(x.device)
    xs = x[perm]
    for i in range(0, len(x), batch):
        xb = xs[i : i + batch]
        xn = xb * (torch.rand_like(xb) >= noise)
        h = torch.sigmoid(F.linear(xn, W, c))
        loss = F.binary_cross_entropy_with_logits(torch.addmm(b, h, W), xb, reduction="sum") / xb.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def ae_bench(x: torch.Tensor, hidden: int, rounds: int, peak: float) -> list[dict]:
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    def ours(method: str) -> None:
        train_autoencoder(x, AEConfig(method=method, hidden=hidden, epochs=1), "h1", 100, g(), False)

    def sync() -> None:
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    med = interleaved({
        "surgery_dae": lambda: (ours("dae"), sync()),
        "surgery_sparse_ae": lambda: (ours("sparse_ae"), sync()),
        "plain_torch_dae": lambda: (plain_dae(x, hidden), sync()),
    }, rounds)
    # encode + decode forward (2 GEMMs), the decoder's input gradient and the two weight
    # gradients (3 GEMMs); the corrupted input needs no gradient: 10 flops per weight.
    flops = 10 * x.shape[1] * hidden
    return [row(f"{k.replace('surgery_', '').replace('plain_torch_', '')} 784->{hidden} b100 {k.split('_')[0]}",
                len(x) / t, flops, peak,
                {"plain_torch_dae": med.ratio(k, "plain_torch_dae")} if k != "plain_torch_dae" else {})
            for k, t in med.items()]


def greedy_bench(x: torch.Tensor, rounds: int, peak: float) -> list[dict]:
    cfg = PretrainConfig(layers=[{"method": "rbm", "hidden": 500, "epochs": 1, "lr": 0.05},
                                 {"method": "dae", "hidden": 500, "epochs": 1},
                                 {"method": "rbm", "hidden": 500, "epochs": 1, "lr": 0.05}])
    # Speed only. Its DAE layer ends with ~76% of units inactive (and warns): above a 1-epoch RBM, whose
    # features need 5 principal components for 90% of their variance (83 for pixels), few units are of use.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryWarning)
        med = interleaved({"greedy": lambda: greedy_pretrain(x, cfg, progress=False)}, rounds)
    flops = 10 * 784 * 500 + 10 * 500 * 500 + 10 * 500 * 500  # training only, not the transforms
    return [row("greedy rbm+dae+rbm 784-500x3 (1 epoch each)", len(x) / med["greedy"], flops, peak)]


def io_bench(rounds: int) -> list[dict]:
    from safetensors.torch import load_file, save_file

    from surgery.stack import LayerStack
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers import random_stack

    st = random_stack(sizes=(784, 1000, 1000, 1000))
    nbytes = sum(t.numel() * 4 for layer in st for t in layer.tensors.values())
    with tempfile.TemporaryDirectory() as d:
        p, q = Path(d) / "s.safetensors", Path(d) / "raw.safetensors"
        raw = {f"{layer.name}.{k}": v for layer in st for k, v in layer.tensors.items()}
        med = interleaved({
            "save": lambda: st.save(p),
            "load": lambda: LayerStack.load(p),
            "raw_save": lambda: save_file(raw, str(q)),
            "raw_load": lambda: [float(t.sum()) for t in load_file(str(q)).values()],  # read, not just mapped
        }, rounds)
    mb = nbytes / 1e6
    return [{"name": f"stack {k} ({mb:.0f} MB)", "samples_per_s": round(mb / t, 1), "unit": "MB/s",
             **({f"x_raw_{k}": round(med.ratio(k, f'raw_{k}'), 3)} if not k.startswith("raw") else {})}
            for k, t in med.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10k examples, 2 rounds (a smoke run)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--n", type=int, default=None, help="training examples (default: all 50k; --quick: 10k)")
    a = ap.parse_args()
    n = a.n or (10000 if a.quick else None)
    rounds = a.rounds or (2 if a.quick else 3)
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    peak = matmul_peak(n=2048 if a.quick else 4096, device=dev)
    rows: list[dict] = []
    x, _ = mnist_train(n, device=a.device)
    rows += rbm_bench.bench(n, 500, rounds, peak, a.device)
    rows += ae_bench(x, 1000, rounds, peak)
    rows += greedy_bench(x, rounds, peak)
    rows += ft_bench.bench(n, 1, rounds, a.device, peak)
    rows += io_bench(rounds)
    if dev == "cpu":
        rows += fw_bench.bench(rounds)
    meta = {"device": a.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "matmul_peak_gflops": round(peak, 1), "examples": n or 50000, "rounds": rounds}
    if a.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    else:
        print(" ".join(f"{k}={v}" for k, v in meta.items()))
        print_rows(rows)


if __name__ == "__main__":
    main()
