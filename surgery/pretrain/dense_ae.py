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

from .ae_model import AEConfig, AEModel
from .base import check_finite
from .sampling import MaskNoise, corrupt


class _Buffers:
    """Per-batch-size operands: ``A = [[dpre, 0], [h, 1]]``, ``R = [[x~, 1], [dlogits, 0]]``,
    and ``grads``: the (left, right) GEMM operands of each parameter matrix's gradient."""

    def __init__(self, b: int, v: int, h: int, dev: torch.device, tied: bool):
        self.x0 = torch.empty(b, v, device=dev)  # the clean batch: the target
        self.A = torch.zeros(2 * b, h + 1, device=dev)
        self.A[b:, h] = 1.0
        self.R = torch.zeros(2 * b, v + 1, device=dev)
        self.R[:b, v] = 1.0
        self.dpre, self.h, self.h_1 = self.A[:b, :h], self.A[b:, :h], self.A[b:]
        self.xn, self.xn_1 = self.R[:b, :v], self.R[:b]
        self.dlog, self.dlog_1 = self.R[b:, :v], self.R[b:]
        self.tmp = torch.empty(b, h, device=dev)
        self.mask = MaskNoise(b, v, dev)
        # tied: one GEMM for [[W, c], [b, 0]]; untied: [W, c] and [Wd; b] separately
        self.grads = ([(self.A.t(), self.R)] if tied
                      else [(self.dpre.t(), self.xn_1), (self.h_1.t(), self.dlog)])


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


def train_dense(x: Tensor, cfg: AEConfig, model: AEModel, mon: Tensor, name: str, batch_size: int,
                generator: torch.Generator, bar) -> list[dict]:
    """Train ``model`` (a dense ``AEModel``, initialised) on ``x`` [N, D]; its parameters hold the
    result. Returns the per-epoch history.

    One function on purpose (a numerical kernel): the batch loop is four GEMMs over views
    of buffers made once here, written in place; split into helpers, each batch would
    rebuild or re-look-up those views."""
    n, nv = x.shape
    nh = cfg.hidden
    dev = x.device
    g = generator if dev.type == "cpu" else None
    act = model.spec.activation
    tied = model.decoder_weight is None
    with torch.no_grad():
        if tied:
            P = torch.zeros(nh + 1, nv + 1, device=dev)
            P[:nh, :nv], P[:nh, nv], P[nh, :nv] = model.weight, model.bias, model.visible_bias
            enc, dec = P[:nh], P[:, :nv]  # [W, c] and [W; b]
            mats = [P]
        else:
            enc = torch.cat([model.weight, model.bias[:, None]], 1)  # [W, c]
            dec = torch.cat([model.decoder_weight, model.visible_bias[None]], 0)  # [Wd; b]
            mats = [enc, dec]
    enc_t = enc.t()
    dec_t = dec[:nh].t()  # Wd^T
    vel = [torch.zeros_like(m) for m in mats] if cfg.momentum else None
    lr, wd, mom = cfg.lr, cfg.weight_decay, cfg.momentum
    rho, sw = cfg.sparsity_target, cfg.sparsity_weight
    bufs: dict[int, _Buffers] = {}
    history = []

    def sync_model() -> None:
        with torch.no_grad():
            model.weight.copy_(enc[:, :nv])
            model.bias.copy_(enc[:, nv])
            model.visible_bias.copy_(dec[nh])
            if not tied:
                model.decoder_weight.copy_(dec[:nh])

    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        total = torch.zeros((), device=dev)
        perm = torch.randperm(n, generator=generator).to(dev)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            bs = idx.shape[0]
            buf = bufs.get(bs) or bufs.setdefault(bs, _Buffers(bs, nv, nh, dev, tied))
            x0 = torch.index_select(x, 0, idx, out=buf.x0)
            if cfg.noise == 0:
                buf.xn.copy_(x0)
            elif cfg.noise_kind == "mask":
                buf.mask(x0, cfg.noise, buf.xn, g)
            else:
                buf.xn.copy_(corrupt(x0, cfg.noise_kind, cfg.noise, g))
            # forward: h = act([x~, 1] @ [W, c]^T), logits = [h, 1] @ [Wd; b]
            _activate(torch.mm(buf.xn_1, enc_t, out=buf.h), act)
            logits = torch.mm(buf.h_1, dec, out=buf.dlog)
            # loss, then its gradient w.r.t. the logits in place (mean over the batch)
            if cfg.loss == "cross_entropy":
                total += F.binary_cross_entropy_with_logits(logits, x0, reduction="sum")
                logits.sigmoid_().sub_(x0).mul_(1.0 / bs)
            else:
                logits.sub_(x0)
                total += torch.linalg.vector_norm(logits).square()
                logits.mul_(2.0 / bs)
            # hidden gradient: dlogits @ Wd^T (+ the sparsity penalty's), times act'
            torch.mm(buf.dlog, dec_t, out=buf.dpre)
            if sw > 0:
                rho_hat = buf.h.mean(0)
                inside = (rho_hat > 1e-6) & (rho_hat < 1 - 1e-6)  # clamp passes no gradient
                r = rho_hat.clamp(1e-6, 1 - 1e-6)
                kl = rho * torch.log(rho / r) + (1 - rho) * torch.log((1 - rho) / (1 - r))
                total += sw * kl.sum() * bs
                buf.dpre.add_((sw / bs) * ((1 - rho) / (1 - r) - rho / r) * inside)
            _times_derivative(buf.dpre, buf.h, act, buf.tmp)
            # every parameter's gradient: one GEMM (tied) or one per matrix (untied)
            for j, (a, b) in enumerate(buf.grads):
                m = mats[j]
                if vel is None:
                    if wd:
                        m.mul_(1 - lr * wd)
                    m.addmm_(a, b, alpha=-lr)
                else:
                    vel[j].addmm_(a, b, beta=mom)
                    if wd:
                        vel[j].add_(m, alpha=wd)
                    m.add_(vel[j], alpha=-lr)
            bar.update(1)
        sync_model()
        m_ = {"epoch": epoch, "loss": float(total) / n, "recon_error": model.recon_error(mon),
              "seconds": round(time.perf_counter() - t0, 4)}
        check_finite(m_["loss"], "loss", name, epoch)
        history.append(m_)
        bar.set_postfix(loss=f"{m_['loss']:.4g}")
    return history
