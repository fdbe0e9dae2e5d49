"""Restricted Boltzmann machines trained by contrastive divergence, as plain matmuls.

Bernoulli-Bernoulli (``rbm``) and Gaussian-Bernoulli with unit-variance visibles
(``grbm``; feed it standardized data). CD-k, or PCD-k with ``persistent: true``.
The weight update is one GEMM over the stacked positive and negative phases:
``[ph0; -phk]^T @ [v0; vk] = ph0^T v0 - phk^T vk`` written into preallocated buffers.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from ..layers import LayerSpec
from ..stack import StackLayer
from .base import (
    LayerPretrainConfig,
    as_rows,
    check_finite,
    monitor_subset,
    n_batches,
    pretrain_record,
    progress_bar,
)
from .sampling import BernoulliSampler


class RBMConfig(LayerPretrainConfig):
    """``{method: rbm|grbm, hidden, epochs, lr, k, persistent, momentum, weight_decay}``."""

    method: Literal["rbm", "grbm"] = "rbm"
    k: int = Field(default=1, ge=1, le=1000, description="Gibbs steps per update (CD-k / PCD-k)")
    persistent: bool = Field(default=False, description="PCD: keep the negative chains across updates")
    init_std: float = Field(default=0.01, gt=0)

    @field_validator("activation")
    @classmethod
    def _sigmoid_only(cls, v: str) -> str:
        if v != "sigmoid":
            raise ValueError(f"activation={v!r}: RBM hidden units are sigmoid (binary stochastic units)")
        return v



class _Buffers:
    """Per-batch-size scratch tensors and their views, so the loop allocates nothing.

    ``hh = [[ph0, 1], [-phk, -1]]`` and ``vv = [[v0, 1], [vk, 1]]``: one GEMM ``hh^T vv``
    yields the weight gradient and, in its last column and row, both bias gradients. The
    ones columns also carry the biases through the forward GEMMs (``[v, 1] @ [W, c]^T =
    vW^T + c``, ``[h, 1] @ [W; b] = hW + b``), so no GEMM starts by copying a bias.
    """

    def __init__(self, b: int, v: int, h: int, dev: torch.device):
        self.hh = torch.empty(2 * b, h + 1, device=dev)
        self.hh[:b, h] = 1.0
        self.hh[b:, h] = -1.0
        self.vv = torch.empty(2 * b, v + 1, device=dev)
        self.vv[:, v] = 1.0
        self.hh_t = self.hh.t()
        self.ph0, self.phk = self.hh[:b, :h], self.hh[b:, :h]
        self.v0, self.vk = self.vv[:b, :v], self.vv[b:, :v]
        self.v0_1, self.vk_1 = self.vv[:b], self.vv[b:]
        self.h_1 = hidden_sample(b, h, dev)  # a hidden sample and its bias unit
        self.h = self.h_1[:, :h]
        self.sample = BernoulliSampler(b, h, dev)


def hidden_sample(b: int, h: int, dev: torch.device) -> Tensor:
    """A [b, h + 1] buffer whose last column is the bias unit (1)."""
    out = torch.empty(b, h + 1, device=dev)
    out[:, h] = 1.0
    return out


def free_energy(v: Tensor, W: Tensor, b: Tensor, c: Tensor, gaussian: bool) -> Tensor:
    """F(v) per example; Bernoulli: -v.b - sum softplus(vW^T + c); Gaussian: 0.5|v-b|^2 - ..."""
    pre = torch.nn.functional.softplus(torch.addmm(c, v, W.t())).sum(1)
    vis = 0.5 * ((v - b) ** 2).sum(1) if gaussian else -(v @ b)
    return vis - pre


@torch.no_grad()
def train_rbm(x: Tensor, cfg: RBMConfig, name: str, batch_size: int, generator: torch.Generator,
              progress: bool | None = None) -> StackLayer:
    """Fit one RBM layer on ``x`` [N, D]; return it with per-epoch metrics.

    One function on purpose (a numerical kernel): the CD-k batch loop works on views of
    buffers made once here, and every step of it is a GEMM or an in-place pass; split
    into helpers, each batch would rebuild or re-look-up those views."""
    x = as_rows(x).contiguous()
    n, nv = x.shape
    nh = cfg.hidden
    dev = x.device
    gaussian = cfg.method == "grbm"
    g = generator if dev.type == "cpu" else None
    if g is None:
        torch.cuda.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    # P = [[W, c], [b, 0]]: weights and both biases in one matrix, updated by one GEMM.
    # Its corner stays exactly 0: the gradient there is (+1) * B + (-1) * B.
    P = torch.zeros(nh + 1, nv + 1, device=dev)
    W, c, b = P[:nh, :nv], P[:nh, nv], P[nh, :nv]
    W.copy_(torch.randn(nh, nv, generator=generator) * cfg.init_std)
    if gaussian:
        b.copy_(x.mean(0))
    else:  # Hinton's guide: visible bias log(p / (1 - p)) of the data's pixel means
        p = x.mean(0).clamp(1e-3, 1 - 1e-3)
        b.copy_(torch.log(p / (1 - p)))
    Wc_t, Wb = P[:nh].t(), P[:, :nv]  # [W, c]^T and [W; b], the forward GEMMs' operands
    vel = torch.zeros_like(P) if cfg.momentum else None
    bufs: dict[int, _Buffers] = {}
    chain: Tensor | None = None
    mon = monitor_subset(x)
    history = []
    bar = progress_bar(cfg.epochs * n_batches(n, batch_size), f"{name} {cfg.method}", progress)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=generator).to(dev)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            bs = idx.shape[0]
            buf = bufs.get(bs) or bufs.setdefault(bs, _Buffers(bs, nv, nh, dev))
            # gather the batch straight into its slot of the fused GEMM's operand
            torch.index_select(x, 0, idx, out=buf.v0)
            torch.mm(buf.v0_1, Wc_t, out=buf.ph0).sigmoid_()
            if cfg.persistent:
                if chain is None:
                    chain = hidden_sample(bs, nh, dev)
                    buf.sample(buf.ph0, chain[:, :nh], g)
                h_1 = chain[:bs]
            else:
                h_1 = buf.h_1
                buf.sample(buf.ph0, buf.h, g)
            for step in range(cfg.k):
                torch.mm(h_1, Wb, out=buf.vk)
                if not gaussian:
                    buf.vk.sigmoid_()
                torch.mm(buf.vk_1, Wc_t, out=buf.phk).sigmoid_()
                if step < cfg.k - 1 or cfg.persistent:
                    buf.sample(buf.phk, h_1[:, :nh], g)
            buf.phk.neg_()
            if vel is None:  # no momentum: the GEMM adds the step straight into P
                if cfg.weight_decay:
                    W.mul_(1 - cfg.lr * cfg.weight_decay)
                P.addmm_(buf.hh_t, buf.vv, alpha=cfg.lr / bs)
            else:
                vel.addmm_(buf.hh_t, buf.vv, beta=cfg.momentum, alpha=cfg.lr / bs)
                if cfg.weight_decay:
                    vel[:nh, :nv].add_(W, alpha=-cfg.lr * cfg.weight_decay)
                P.add_(vel)
            bar.update(1)
        m = _metrics(mon, W, b, c, gaussian, generator)
        m.update(epoch=epoch, seconds=round(time.perf_counter() - t0, 4))
        check_finite(m["recon_error"], "reconstruction error", name, epoch)
        history.append(m)
        bar.set_postfix(recon=f"{m['recon_error']:.4g}")
    bar.close()
    spec = LayerSpec(in_features=nv, out_features=nh, activation="sigmoid")  # RBM hiddens are sigmoid
    return StackLayer(
        name,
        spec,
        {"weight": W.clone(), "bias": c.clone(), "visible_bias": b.clone()},
        pretrain_record(cfg.method, cfg, batch_size, history),
    )


def _metrics(v: Tensor, W: Tensor, b: Tensor, c: Tensor, gaussian: bool, g: torch.Generator) -> dict:
    """Mean-field reconstruction error, mean free energy and (Bernoulli) a stochastic
    pseudo-log-likelihood estimate on the monitor rows, in three GEMMs."""
    ph = torch.sigmoid(torch.addmm(c, v, W.t()))
    pv = torch.addmm(b, ph, W)
    if not gaussian:
        pv = pv.sigmoid()
    out = {"recon_error": float(((v - pv) ** 2).sum(1).mean())}
    if gaussian:
        out["free_energy"] = float(free_energy(v, W, b, c, True).mean())
        return out
    # Free energy of the binarized rows, and of the same rows with one random bit flipped
    # (as scikit-learn's score_samples does): the flip changes the hidden pre-activation
    # by +-one column of W, so the second free energy needs no GEMM.
    vb = (v > 0.5).float()
    pre = torch.addmm(c, vb, W.t())
    rows = torch.arange(v.shape[0], device=v.device)
    idx = torch.randint(0, v.shape[1], (v.shape[0],), generator=g).to(v.device)
    sign = 1 - 2 * vb[rows, idx]  # +1: the bit turns on, -1: it turns off
    pre1 = pre + sign.unsqueeze(1) * W.t()[idx]
    f0 = -(vb @ b) - F.softplus(pre).sum(1)
    f1 = -(vb @ b) - sign * b[idx] - F.softplus(pre1).sum(1)
    out["free_energy"] = float(f0.mean())
    out["pseudo_likelihood"] = float(-F.softplus(f0 - f1).mean() * v.shape[1])
    return out
