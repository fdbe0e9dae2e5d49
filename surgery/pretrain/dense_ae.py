"""The dense autoencoder's training loop with hand-written gradients.

The same model and the same SGD (momentum, weight decay on every parameter) as autograd
and ``torch.optim.SGD`` would run, in the fewest passes over memory: the weights and both
biases live in one matrix ``P = [[W, c], [b, 0]]`` (tied; untied keeps ``[W, c]`` and
``[Wd; b]``), ones columns carry the biases through the GEMMs, and the tied weight's two
gradients (encoder and decoder) come out of ONE GEMM over the stacked operands

    [[dpre, 0], [h, 1]]^T @ [[x~, 1], [dlogits, 0]]
        = [[dpre^T x~ + h^T dlogits,  sum dpre], [sum dlogits,  0]],

written straight into the velocity (or into ``P`` without momentum). Per batch: 2 forward
GEMMs, 1 for the hidden gradient, 1 for every parameter's gradient; no allocation on the
mask-noise path. ``tests/test_pretrain.py`` checks it against autograd for every
activation, loss, tying, sparsity, momentum and weight decay.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

from ..batched import RowGather, loops_on, matmul, member_tensor
from .ae_model import AEConfig, AEModel
from .base import check_finite, device_generator, member_label, monitor_subset
from .sampling import CHUNK, BatchWalk, MaskNoise, WordBank, corrupt, draws


class _Buffers:
    """Per-batch-size operands of K members: ``A = [[dpre, 0], [h, 1]]``, ``R = [[x~, 1],
    [dlogits, 0]]``, and ``grads``: the (left, right) GEMM operands of each parameter
    matrix's gradient."""

    def __init__(self, K: int, b: int, v: int, h: int, dev: torch.device, tied: bool):
        self.x0 = member_tensor(K, (b, v), dev)  # the clean batch: the target
        self.A = member_tensor(K, (2 * b, h + 1), dev)
        self.A[:, b:, h] = 1.0
        self.R = member_tensor(K, (2 * b, v + 1), dev)
        self.R[:, :b, v] = 1.0
        self.dpre, self.h, self.h_1 = self.A[:, :b, :h], self.A[:, b:, :h], self.A[:, b:]
        self.xn, self.xn_1 = self.R[:, :b, :v], self.R[:, :b]
        self.dlog, self.dlog_1 = self.R[:, b:, :v], self.R[:, b:]
        self.tmp = member_tensor(K, (b, h), dev)
        self.masks = [MaskNoise(b, v, dev) for _ in range(K)]
        # tied: one GEMM for [[W, c], [b, 0]]; untied: [W, c] and [Wd; b] separately
        self.grads = ([(self.A.mT, self.R)] if tied else [(self.dpre.mT, self.xn_1), (self.h_1.mT, self.dlog)])


def _times_derivative(dh: Tensor, h: Tensor, act: str, tmp: Tensor) -> None:
    """``dh *= act'(pre)``, written in terms of the output ``h = act(pre)``."""
    if act == "sigmoid":
        torch.mul(h, h, out=tmp)
        dh.mul_(torch.sub(h, tmp, out=tmp))  # h (1 - h)
    elif act == "tanh":
        dh.mul_(torch.mul(h, h, out=tmp).neg_().add_(1.0))  # 1 - h^2
    elif act == "relu":
        dh.masked_fill_(h <= 0, 0.0)
    elif act == "softplus":
        dh.mul_(torch.neg(h, out=tmp).expm1_().neg_())  # sigmoid(pre) = 1 - exp(-h)
    # linear: the derivative is 1


def _activate(h: Tensor, act: str) -> None:
    if act == "sigmoid":
        h.sigmoid_()
    elif act == "tanh":
        h.tanh_()
    elif act == "relu":
        h.relu_()
    elif act == "softplus":
        h.copy_(F.softplus(h))


def train_dense(xs: list[Tensor], cfgs: list[AEConfig], models: list[AEModel], names: list[str], batch_size: int,
                generators: list[torch.Generator], bar, stacked: bool | None = None, capture: bool = True,
                ahead: bool | None = None) -> list[list[dict]]:
    """Train K dense ``AEModel``s (initialised) together, member k on ``xs[k]`` [N, D] with its
    own config and generator; their parameters hold the result, as each would alone.
    Returns the per-epoch histories. ``stacked`` (default: on CUDA) runs each GEMM of all
    members as one ``bmm``; otherwise member by member (K = 1: the single-model loop).
    ``capture``: on a GPU, replay each full batch's step from a CUDA graph (masking noise:
    its random words drawn ahead, ``ahead``; Gaussian or salt-and-pepper noise: eager)."""
    pop = _DensePopulation(xs, cfgs, models, names, generators, stacked, batch_size, capture, ahead)
    histories: list[list[dict]] = [[] for _ in xs]
    mons = [monitor_subset(x) for x in xs]
    n, K = xs[0].shape[0], len(xs)
    for epoch in range(1, cfgs[0].epochs + 1):
        t0 = time.perf_counter()
        pop.total.zero_()
        pop.walk.epoch(generators, bar, pop.refill if pop.bank is not None else None, pop.drawn_now)
        pop.sync_models()
        seconds = round(time.perf_counter() - t0, 4)
        for k, model in enumerate(models):
            m = {"epoch": epoch, "loss": float(pop.total[k]) / n, **model.monitor(mons[k]),
                 "seconds": seconds}
            check_finite(m["loss"], "loss", member_label(names[k], k, K), epoch)
            histories[k].append(m)
        bar.set_postfix(loss=f"{histories[0][-1]['loss']:.4g}")
    return histories


class _DensePopulation:
    """K dense autoencoders' parameter matrices (stacked), velocities, buffers and draws."""

    def __init__(self, xs: list[Tensor], cfgs: list[AEConfig], models: list[AEModel], names: list[str],
                 gens: list[torch.Generator], stacked: bool | None, batch_size: int, capture: bool,
                 ahead: bool | None):
        self.cfgs, self.models, self.cfg, self.K = cfgs, models, cfgs[0], len(xs)
        self.nv, self.nh, self.dev = xs[0].shape[1], cfgs[0].hidden, xs[0].device
        self.act, self.tied = models[0].spec.activation, models[0].decoder_weight is None
        self.loop = loops_on(self.dev) if stacked is None else not stacked
        self.gather = RowGather(xs, self.loop)
        self.draw = [device_generator(g, self.dev) for g in gens]
        nh, nv = self.nh, self.nv
        with torch.no_grad():
            if self.tied:
                P = member_tensor(self.K, (nh + 1, nv + 1), self.dev)
                for k, m in enumerate(models):
                    P[k, :nh, :nv], P[k, :nh, nv], P[k, nh, :nv] = m.weight, m.bias, m.visible_bias
                self.enc, self.dec = P[:, :nh], P[:, :, :nv]  # [W, c] and [W; b]
                self.mats = [P]
            else:
                self.enc = member_tensor(self.K, (nh, nv + 1), self.dev)  # [W, c]
                self.dec = member_tensor(self.K, (nh + 1, nv), self.dev)  # [Wd; b]
                for k, m in enumerate(models):
                    self.enc[k, :, :nv], self.enc[k, :, nv] = m.weight, m.bias
                    self.dec[k, :nh], self.dec[k, nh] = m.decoder_weight, m.visible_bias
                self.mats = [self.enc, self.dec]
        self.enc_t = self.enc.transpose(1, 2)
        self.dec_t = self.dec[:, :nh].transpose(1, 2)  # Wd^T
        self.vel = ([member_tensor(self.K, tuple(m.shape[1:]), self.dev) for m in self.mats]
                    if any(c.momentum for c in cfgs) else None)
        self.uniform = len({(c.lr, c.momentum, c.weight_decay) for c in cfgs}) == 1
        self.bufs: dict[int, _Buffers] = {}
        self.total = torch.zeros(self.K, device=self.dev)  # each member's summed loss this epoch
        # On a GPU each full batch's step is captured once and replayed (BatchWalk), its mask
        # noise read from words drawn ahead; Gaussian and salt-and-pepper noise stay eager.
        self.masked = [k for k, c in enumerate(cfgs) if c.noise > 0]
        drawn_now = self.cfg.noise_kind != "mask" and bool(self.masked)
        capture = capture and self.dev.type == "cuda" and not drawn_now
        self.walk = BatchWalk(self.K, xs[0].shape[0], batch_size, self.dev, self.step, capture)
        self.ahead = capture if ahead is None else ahead and not drawn_now
        self.bank = WordBank(self.K, CHUNK * draws(batch_size, nv), self.dev) if self.ahead and self.masked else None
        self.batch = batch_size

    def refill(self, steps: int) -> None:
        """Draw the mask words of the next ``steps`` full batches (members with noise only)."""
        assert self.bank is not None
        self.bank.refill(steps * draws(self.batch, self.nv), self.draw, self.masked)

    def drawn_now(self, idx: Tensor) -> None:
        """A step whose noise is drawn from the generators as it goes (the partial last batch)."""
        self.step(idx, banked=False)

    def step(self, idx: Tensor, banked: bool = True) -> None:
        """One SGD step of every member on its rows ``idx[k]``; adds each member's summed loss
        to ``total[k]``. ``banked``: mask noise from the words drawn ahead (when there are)."""
        bs, loop, total = idx.shape[1], self.loop, self.total
        buf = self.bufs.get(bs) or self.bufs.setdefault(bs, _Buffers(self.K, bs, self.nv, self.nh, self.dev, self.tied))
        x0 = self.gather(idx, buf.x0)
        self.corrupt(buf, x0, self.bank.take(bs, self.nv) if banked and self.bank is not None else None)
        # forward: h = act([x~, 1] @ [W, c]^T), logits = [h, 1] @ [Wd; b]
        _activate(matmul(buf.xn_1, self.enc_t, loop, out=buf.h), self.act)
        logits = matmul(buf.h_1, self.dec, loop, out=buf.dlog)
        # loss, then its gradient w.r.t. the logits in place (mean over the batch)
        for k in range(self.K):
            if self.cfg.loss == "cross_entropy":
                total[k] += F.binary_cross_entropy_with_logits(logits[k], x0[k], reduction="sum")
            else:
                total[k] += torch.linalg.vector_norm(logits[k].sub_(x0[k])).square()
        if self.cfg.loss == "cross_entropy":
            logits.sigmoid_().sub_(x0).mul_(1.0 / bs)
        else:
            logits.mul_(2.0 / bs)
        # hidden gradient: dlogits @ Wd^T (+ the sparsity penalty's), times act'
        matmul(buf.dlog, self.dec_t, loop, out=buf.dpre)
        for k, cfg in enumerate(self.cfgs):
            if cfg.sparsity_weight > 0:
                total[k] += _sparsity(buf.h[k], buf.dpre[k], cfg.sparsity_target, cfg.sparsity_weight)
        _times_derivative(buf.dpre, buf.h, self.act, buf.tmp)
        self.update(buf)

    def corrupt(self, buf: _Buffers, x0: Tensor, words: Tensor | None) -> None:
        """Each member's corrupted input ``x~`` from its own stream (``words`` [K, b, v] drawn
        ahead, or drawn now from its generator), at its own level."""
        for k, cfg in enumerate(self.cfgs):
            if cfg.noise == 0:
                buf.xn[k].copy_(x0[k])
            elif cfg.noise_kind == "mask":
                buf.masks[k](x0[k], cfg.noise, buf.xn[k], self.draw[k], None if words is None else words[k])
            else:
                buf.xn[k].copy_(corrupt(x0[k], cfg.noise_kind, cfg.noise, self.draw[k]))

    def update(self, buf: _Buffers) -> None:
        """Every parameter's gradient in one GEMM (tied) or one per matrix (untied), into SGD:
        all members at once when the GEMMs are batched and they share hyperparameters,
        otherwise member by member."""
        for j, (a, b) in enumerate(buf.grads):
            m, vel = self.mats[j], None if self.vel is None else self.vel[j]
            if self.uniform and not self.loop:
                _sgd(m, vel, a, b, self.cfg)
                continue
            for k, cfg in enumerate(self.cfgs):
                _sgd(m[k], None if vel is None or not cfg.momentum else vel[k], a[k], b[k], cfg)

    def sync_models(self) -> None:
        """Copy each member's matrices back into its ``AEModel``."""
        nh, nv = self.nh, self.nv
        with torch.no_grad():
            for k, model in enumerate(self.models):
                model.weight.copy_(self.enc[k, :, :nv])
                model.bias.copy_(self.enc[k, :, nv])
                model.visible_bias.copy_(self.dec[k, nh])
                if not self.tied:
                    model.decoder_weight.copy_(self.dec[k, :nh])


def _sparsity(h: Tensor, dpre: Tensor, rho: float, sw: float) -> Tensor:
    """Add the KL sparsity penalty's gradient to ``dpre``; return the penalty times the batch size."""
    bs = h.shape[0]
    rho_hat = h.mean(0)
    inside = (rho_hat > 1e-6) & (rho_hat < 1 - 1e-6)  # clamp passes no gradient
    r = rho_hat.clamp(1e-6, 1 - 1e-6)
    kl = rho * torch.log(rho / r) + (1 - rho) * torch.log((1 - rho) / (1 - r))
    dpre.add_((sw / bs) * ((1 - rho) / (1 - r) - rho / r) * inside)
    return sw * kl.sum() * bs


def _sgd(m: Tensor, vel: Tensor | None, a: Tensor, b: Tensor, cfg: AEConfig) -> None:
    """``m -= lr a @ b`` with momentum and weight decay, as ``torch.optim.SGD``; 2-D for one
    member, 3-D (``baddbmm``) for members that share their hyperparameters."""
    gemm = torch.Tensor.addmm_ if m.dim() == 2 else torch.Tensor.baddbmm_
    lr, wd = cfg.lr, cfg.weight_decay
    if vel is None:
        if wd:
            m.mul_(1 - lr * wd)
        gemm(m, a, b, alpha=-lr)
    else:
        gemm(vel, a, b, beta=cfg.momentum)
        if wd:
            vel.add_(m, alpha=wd)
        m.add_(vel, alpha=-lr)
