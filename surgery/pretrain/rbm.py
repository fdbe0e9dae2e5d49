"""Restricted Boltzmann machines trained by contrastive divergence, as plain matmuls.

Bernoulli-Bernoulli (``rbm``) and Gaussian-Bernoulli with unit-variance visibles
(``grbm``; feed it standardized data). CD-k, or PCD-k with ``persistent: true``.
The weight update is one GEMM over the stacked positive and negative phases:
``[ph0; -phk]^T @ [v0; vk] = ph0^T v0 - phk^T vk`` written into preallocated buffers.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from ..batched import RowGather, loops_on, matmul, member_tensor
from ..configs import as_config, as_tensor
from ..layers import LayerSpec
from ..stack import StackLayer
from .base import (
    LayerPretrainConfig,
    check_examples,
    check_finite,
    check_input,
    check_members,
    device_generator,
    inactive_fraction,
    layer_batch,
    member_label,
    monitor_subset,
    n_batches,
    new_generator,
    pretrain_record,
    progress_bar,
    rows_once,
    warn_inactive,
)
from .sampling import CHUNK, BatchWalk, BernoulliSampler, WordBank, draws


class RBMConfig(LayerPretrainConfig):
    """``{method: rbm|grbm, hidden, epochs, lr, k, persistent, momentum, final_momentum, weight_decay}``."""

    method: Literal["rbm", "grbm"] = "rbm"
    k: int = Field(default=1, ge=1, le=1000, description="Gibbs steps per update (CD-k / PCD-k)")
    persistent: bool = Field(default=False, description="PCD: keep the negative chains across updates")
    init_std: float = Field(default=0.01, gt=0)
    final_momentum: float | None = Field(
        default=None, ge=0, lt=1, description="momentum after the first `momentum_switch` epochs (Hinton's practical "
        "guide: 0.5, then 0.9 after 5); none: `momentum` throughout")
    momentum_switch: int = Field(default=5, ge=0, description="epochs trained at `momentum` before `final_momentum`")

    def momentum_at(self, epoch: int) -> float:
        """The momentum of 1-based ``epoch``: ``momentum``, then ``final_momentum`` after the switch."""
        if self.final_momentum is not None and epoch > self.momentum_switch:
            return self.final_momentum
        return self.momentum

    @field_validator("activation")
    @classmethod
    def _sigmoid_only(cls, v: str) -> str:
        if v != "sigmoid":
            raise ValueError(f"activation={v!r}: RBM hidden units are sigmoid (binary stochastic units)")
        return v



class _Buffers:
    """Per-batch-size scratch tensors of K members and their views, so the loop allocates nothing.

    ``hh = [[ph0, 1], [-phk, -1]]`` and ``vv = [[v0, 1], [vk, 1]]`` (one pair per member):
    one GEMM ``hh^T vv`` yields the weight gradient and, in its last column and row, both
    bias gradients. The ones columns also carry the biases through the forward GEMMs
    (``[v, 1] @ [W, c]^T = vW^T + c``, ``[h, 1] @ [W; b] = hW + b``), so no GEMM starts by
    copying a bias.
    """

    def __init__(self, K: int, b: int, v: int, h: int, dev: torch.device):
        self.hh = member_tensor(K, (2 * b, h + 1), dev)
        self.hh[:, :b, h] = 1.0
        self.hh[:, b:, h] = -1.0
        self.vv = member_tensor(K, (2 * b, v + 1), dev)
        self.vv[:, :, v] = 1.0
        self.hh_t = self.hh.transpose(1, 2)
        self.ph0, self.phk = self.hh[:, :b, :h], self.hh[:, b:, :h]
        self.v0, self.vk = self.vv[:, :b, :v], self.vv[:, b:, :v]
        self.v0_1, self.vk_1 = self.vv[:, :b], self.vv[:, b:]
        self.h_1 = hidden_sample(K, b, h, dev)  # a hidden sample and its bias unit
        self.h = self.h_1[:, :, :h]
        self.samplers = [BernoulliSampler(b, h, dev) for _ in range(K)]


def hidden_sample(K: int, b: int, h: int, dev: torch.device) -> Tensor:
    """A [K, b, h + 1] buffer whose last column is the bias unit (1)."""
    out = member_tensor(K, (b, h + 1), dev)
    out[:, :, h] = 1.0
    return out


def free_energy(v: Tensor, W: Tensor, b: Tensor, c: Tensor, gaussian: bool) -> Tensor:
    """F(v) per example; Bernoulli: -v.b - sum softplus(vW^T + c); Gaussian: 0.5|v-b|^2 - ..."""
    pre = torch.nn.functional.softplus(torch.addmm(c, v, W.t())).sum(1)
    vis = 0.5 * ((v - b) ** 2).sum(1) if gaussian else -(v @ b)
    return vis - pre


@torch.no_grad()
def train_rbm(x: Tensor, cfg: RBMConfig | dict[str, Any], name: str = "h1", batch_size: int | None = None,
              generator: torch.Generator | None = None, progress: bool | None = None) -> StackLayer:
    """Fit one RBM layer on ``x`` [N, D]; return it with per-epoch metrics (a population of one).
    ``batch_size`` defaults to ``cfg.batch_size``, else 100; ``generator`` (init, data order,
    Gibbs samples) to one seeded with 0; ``cfg`` may be a dict of RBMConfig's fields."""
    where = "surgery.train_rbm(x, cfg)"
    cfg = as_config({"method": "rbm", **cfg} if isinstance(cfg, dict) else cfg, RBMConfig, where)
    x = as_tensor(x, where)
    check_input(name, cfg, x)
    return train_rbm_population([x], [cfg], [name], layer_batch(batch_size, cfg),
                                [generator or new_generator(0)], progress)[0]


@torch.no_grad()
def train_rbm_population(xs: list[Tensor], cfgs: list[RBMConfig], names: list[str], batch_size: int,
                         generators: list[torch.Generator], progress: bool | None = None,
                         stacked: bool | None = None, capture: bool = True,
                         ahead: bool | None = None) -> list[StackLayer]:
    """Fit K RBM layers together, member k on ``xs[k]`` [N, D] with ``cfgs[k]`` and its own
    generator (init, data order, samples); each comes out as it would alone.

    Members share the shape, method, CD steps and epochs; lr, momentum, weight decay and
    init scale may differ. ``stacked`` (default: on CUDA) runs each GEMM of all members as
    one ``bmm``; otherwise member by member, which for K = 1 is the single-model loop.
    ``capture``: on a GPU, replay each full batch's step from a CUDA graph, its random
    words drawn ahead (``ahead``, default: when captured) into a bank."""
    check_members(cfgs, ("method", "hidden", "epochs", "k", "persistent"), names)
    check_examples(xs, names, batch_size)
    return _RBMPopulation(rows_once(xs), cfgs, names, generators, stacked, capture, ahead).fit(batch_size,
                                                                                              progress)


class _RBMPopulation:
    """The state of K RBMs trained together: ``P[k] = [[W, c], [b, 0]]``, weights and both
    biases in one matrix updated by one GEMM (its corner stays exactly 0: the gradient there
    is (+1) * B + (-1) * B), velocities, generators and per-member hyperparameters."""

    def __init__(self, xs: list[Tensor], cfgs: list[RBMConfig], names: list[str], gens: list[torch.Generator],
                 stacked: bool | None, capture: bool = True, ahead: bool | None = None):
        self.xs, self.cfgs, self.names, self.gens = xs, cfgs, names, gens
        self.K, (self.n, nv) = len(xs), xs[0].shape
        self.cfg, nh, dev = cfgs[0], cfgs[0].hidden, xs[0].device
        self.nv, self.nh, self.dev = nv, nh, dev
        self.gaussian = self.cfg.method == "grbm"
        self.loop = loops_on(dev) if stacked is None else not stacked
        self.gather = RowGather(xs, self.loop)
        self.P = member_tensor(self.K, (nh + 1, nv + 1), dev)
        self.W, self.c, self.b = self.P[:, :nh, :nv], self.P[:, :nh, nv], self.P[:, nh, :nv]
        self.draw = []
        for k, (x, cfg, g) in enumerate(zip(xs, cfgs, gens)):
            self.draw.append(device_generator(g, dev))
            self.W[k].copy_(torch.randn(nh, nv, generator=g) * cfg.init_std)
            if self.gaussian:
                self.b[k].copy_(x.mean(0))
            else:  # Hinton's guide: visible bias log(p / (1 - p)) of the data's pixel means
                p = x.mean(0).clamp(1e-3, 1 - 1e-3)
                self.b[k].copy_(torch.log(p / (1 - p)))
        self.Wc_t, self.Wb = self.P[:, :nh].transpose(1, 2), self.P[:, :, :nv]  # the forward GEMMs' operands
        self.vel = member_tensor(self.K, (nh + 1, nv + 1), dev) if any(_has_momentum(c) for c in cfgs) else None
        self.bufs: dict[int, _Buffers] = {}
        self.chain: Tensor | None = None
        hyper = {(c.lr, c.momentum, c.final_momentum, c.momentum_switch, c.weight_decay) for c in cfgs}
        # A momentum that changes between epochs lives in a device tensor the (captured) step
        # reads, set in place at each epoch's start; a constant one is the GEMM's beta.
        ramps = any(c.final_momentum is not None for c in cfgs)
        self.mom = torch.tensor([c.momentum for c in cfgs], device=dev).view(-1, 1, 1) if ramps else None
        # Each member's velocity and momentum views for the member-by-member update, made once.
        self.member_state = [(None if self.vel is None or not _has_momentum(c) else self.vel[k],
                              None if self.mom is None or c.final_momentum is None else self.mom[k])
                             for k, c in enumerate(cfgs)]
        self.uniform = len(hyper) == 1
        # On a GPU each full batch's step is captured once and replayed (BatchWalk), reading
        # its samples' random words from a bank drawn ahead; eager, it draws them as it goes
        # (the same words on a CPU: tests/test_population.py), which measured ~6% faster
        # there than going through the bank.
        self.capture = capture and dev.type == "cuda"
        self.ahead = self.capture if ahead is None else ahead
        self.bank: WordBank | None = None
        self.banked = True

    def fit(self, batch_size: int, progress: bool | None) -> list[StackLayer]:
        """Train every member for the shared number of epochs; return their layers."""
        histories: list[list[dict]] = [[] for _ in range(self.K)]
        mons = [monitor_subset(x) for x in self.xs]
        label = f"{self.names[0]} {self.cfg.method}" + (f" x{self.K}" if self.K > 1 else "")
        bar = progress_bar(self.cfg.epochs * n_batches(self.n, batch_size), label, progress)
        walk = BatchWalk(self.K, self.n, batch_size, self.dev, self.step, self.capture)
        if self.ahead:
            self.bank = WordBank(self.K, (CHUNK * self.cfg.k + 1) * draws(batch_size, self.nh), self.dev)

        def refill(steps: int) -> None:  # k samples a batch, and the chains' very first one
            assert self.bank is not None
            first = 1 if self.cfg.persistent and self.chain is None else 0
            self.bank.refill((steps * self.cfg.k + first) * draws(batch_size, self.nh), self.draw)

        for epoch in range(1, self.cfg.epochs + 1):
            t0 = time.perf_counter()
            if self.mom is not None:
                self.mom.copy_(torch.tensor([c.momentum_at(epoch) for c in self.cfgs]).view(-1, 1, 1))
            walk.epoch(self.gens, bar, refill if self.bank is not None else None, self._drawn_now)
            seconds = round(time.perf_counter() - t0, 4)
            for k in range(self.K):
                m = _metrics(mons[k], self.W[k], self.b[k], self.c[k], self.gaussian, self.gens[k])
                m.update(epoch=epoch, seconds=seconds)
                check_finite(m["recon_error"], "reconstruction error", member_label(self.names[k], k, self.K), epoch)
                histories[k].append(m)
            bar.set_postfix(recon=f"{histories[0][-1]['recon_error']:.4g}")
        bar.close()
        for k in range(self.K):
            warn_inactive(histories[k], member_label(self.names[k], k, self.K), self.cfgs[k].lr)
        spec = LayerSpec(in_features=self.nv, out_features=self.nh, activation="sigmoid")  # RBM hiddens are sigmoid
        return [StackLayer(self.names[k], spec,
                           {"weight": self.W[k].clone(), "bias": self.c[k].clone(), "visible_bias": self.b[k].clone()},
                           pretrain_record(cfg.method, cfg, batch_size, histories[k]))
                for k, cfg in enumerate(self.cfgs)]

    def step(self, idx: Tensor) -> None:
        """One CD-k (or PCD-k) update of every member on its rows ``idx[k]``."""
        bs, nh, loop = idx.shape[1], self.nh, self.loop
        buf = self.bufs.get(bs) or self.bufs.setdefault(bs, _Buffers(self.K, bs, self.nv, nh, self.dev))
        self.gather(idx, buf.v0)  # the batch straight into its slot of the fused GEMM's operand
        matmul(buf.v0_1, self.Wc_t, loop, out=buf.ph0).sigmoid_()
        if self.cfg.persistent:
            if self.chain is None:
                self.chain = hidden_sample(self.K, bs, nh, self.dev)
                self.sample(buf, buf.ph0, self.chain[:, :, :nh])
            h_1 = self.chain[:, :bs]
        else:
            h_1 = buf.h_1
            self.sample(buf, buf.ph0, buf.h)
        for step in range(self.cfg.k):
            matmul(h_1, self.Wb, loop, out=buf.vk)
            if not self.gaussian:
                buf.vk.sigmoid_()
            matmul(buf.vk_1, self.Wc_t, loop, out=buf.phk).sigmoid_()
            if step < self.cfg.k - 1 or self.cfg.persistent:
                self.sample(buf, buf.phk, h_1[:, :, :nh])
        buf.phk.neg_()
        self.update(buf, bs)

    def _drawn_now(self, idx: Tensor) -> None:
        """A step whose samples are drawn from the generators as it goes (the partial last batch)."""
        self.banked = False
        self.step(idx)
        self.banked = True

    def sample(self, buf: _Buffers, p: Tensor, out: Tensor) -> None:
        """``out[k] ~ Bernoulli(p[k])`` from member k's own stream: words drawn ahead into
        the bank, or (the partial last batch) drawn now from its generator."""
        words = self.bank.take(p.shape[1], p.shape[2]) if self.banked and self.bank is not None else None
        for k in range(self.K):
            buf.samplers[k](p[k], out[k], self.draw[k], None if words is None else words[k])

    def update(self, buf: _Buffers, bs: int) -> None:
        """SGD with momentum and weight decay for every member, exactly as alone: all at once
        with one ``baddbmm`` when the GEMMs are batched and the members share lr, momentum
        and decay; otherwise member by member. Without momentum the GEMM adds the step
        straight into ``P``, with it into the velocity."""
        if self.uniform and not self.loop:
            _sgd(self.P, self.vel, self.W, buf.hh_t, buf.vv, self.cfg, bs, self.nh, self.nv, self.mom)
            return
        for k, (cfg, (vel, mom)) in enumerate(zip(self.cfgs, self.member_state)):
            _sgd(self.P[k], vel, self.W[k], buf.hh_t[k], buf.vv[k], cfg, bs, self.nh, self.nv, mom)


def _has_momentum(cfg: RBMConfig) -> bool:
    return bool(cfg.momentum) or cfg.final_momentum is not None


def _sgd(P: Tensor, vel: Tensor | None, W: Tensor, a: Tensor, b: Tensor, cfg: RBMConfig, bs: int, nh: int,
         nv: int, mom: Tensor | None = None) -> None:
    """``P += lr/B a @ b`` with momentum and weight decay on ``W``; 2-D for one member, 3-D
    (``baddbmm``) for members that share their hyperparameters."""
    gemm = torch.Tensor.addmm_ if P.dim() == 2 else torch.Tensor.baddbmm_
    if vel is None:
        if cfg.weight_decay:
            W.mul_(1 - cfg.lr * cfg.weight_decay)
        gemm(P, a, b, alpha=cfg.lr / bs)
    else:
        if mom is None:
            gemm(vel, a, b, beta=cfg.momentum, alpha=cfg.lr / bs)
        else:  # this epoch's momentum, from a tensor (a captured step reads it at replay)
            gemm(vel.mul_(mom), a, b, alpha=cfg.lr / bs)
        if cfg.weight_decay:
            vel[..., :nh, :nv].add_(W, alpha=-cfg.lr * cfg.weight_decay)
        P.add_(vel)


def _metrics(v: Tensor, W: Tensor, b: Tensor, c: Tensor, gaussian: bool, g: torch.Generator) -> dict:
    """Mean-field reconstruction error, mean free energy and (Bernoulli) a stochastic
    pseudo-log-likelihood estimate on the monitor rows, in three GEMMs."""
    ph = torch.sigmoid(torch.addmm(c, v, W.t()))
    pv = torch.addmm(b, ph, W)
    if not gaussian:
        pv = pv.sigmoid()
    out = {"recon_error": float(((v - pv) ** 2).sum(1).mean()), "inactive_units": inactive_fraction(ph)}
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
