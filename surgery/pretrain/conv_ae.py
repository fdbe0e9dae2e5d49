"""Convolutional autoencoder layers of K members trained together as grouped convolutions.

Member k's filters are group k of one convolution (``groups=K``): the encoder weight is
``[K * maps, C, kh, kw]``, the input ``[B, K * C, H, W]`` holds member k's own batch (its
own data order and corruption) in channels ``k C .. (k + 1) C``, and the tied decoder is
the transposed convolution with the same weight and groups. Autograd computes every
member's gradients in one backward pass (the members' losses are summed; none depends on
another's weights), and :class:`surgery.stacked.StackedOptimizer` applies SGD with each
member's lr, momentum and weight decay, as ``torch.optim.SGD`` does for it alone.
K = 1 is the single layer through the same code.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

from ..stacked import StackedOptimizer
from .ae_model import AEConfig, AEModel
from .base import check_finite, device_generator, member_label, monitor_subset
from .sampling import corrupt


class ConvPopulation:
    """The K members' parameters as grouped-convolution tensors (``weight``, ``bias``,
    ``visible_bias``, untied ``decoder_weight``), with [K, ...] views for the optimizer."""

    def __init__(self, models: list[AEModel], cfgs: list[AEConfig]):
        self.models, self.cfgs, self.K = models, cfgs, len(models)
        self.spec, m0 = models[0].spec, models[0]
        names = ["weight", "bias", "visible_bias"] + ([] if m0.decoder_weight is None else ["decoder_weight"])
        self.params = {n: torch.cat([getattr(m, n).detach() for m in models]).requires_grad_() for n in names}
        order = [n for n in names if n != "bias" and n != "visible_bias"] + ["bias", "visible_bias"]
        views = [self.params[n].view(self.K, *getattr(m0, n).shape) for n in order]
        self.opt = StackedOptimizer(views, [torch.empty(0)] * len(views), "sgd", [[1.0] * len(views)] * self.K,
                                    [c.weight_decay for c in cfgs])
        self.order = order
        dev = views[0].device
        self.lr = torch.tensor([c.lr for c in cfgs], device=dev)
        self.mom = torch.tensor([c.momentum for c in cfgs], device=dev)
        self.sparsity = torch.tensor([c.sparsity_weight for c in cfgs], device=dev)

    def losses(self, x_in: Tensor, target: Tensor) -> Tensor:
        """Each member's loss [K] (summed over its batch rows / B, plus its sparsity
        penalty) for inputs and targets [B, K * C, H, W]."""
        s, K, p = self.spec, self.K, self.params
        h = self.models[0].act(F.conv2d(x_in, p["weight"], p["bias"], stride=s.stride, padding=s.padding, groups=K))
        w = p.get("decoder_weight", p["weight"])
        out = F.conv_transpose2d(h, w, stride=s.stride, padding=s.padding, groups=K)
        dh, dw = target.shape[2] - out.shape[2], target.shape[3] - out.shape[3]
        if dh or dw:
            out = F.pad(out, (0, dw, 0, dh))
        logits = out + p["visible_bias"].view(1, -1, 1, 1)
        n = target.shape[0]
        if self.cfgs[0].loss == "cross_entropy":
            rec = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        else:
            rec = F.mse_loss(logits, target, reduction="none")
        losses = rec.view(n, K, -1).sum((0, 2)) / n
        if any(c.sparsity_weight > 0 for c in self.cfgs):
            rho = self.cfgs[0].sparsity_target
            rho_hat = h.view(n, K, -1, *h.shape[2:]).mean(dim=(0, 3, 4)).clamp(1e-6, 1 - 1e-6)  # [K, maps]
            kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
            losses = losses + self.sparsity * kl.sum(1)
        return losses

    def step(self, x_in: Tensor, target: Tensor, step: int) -> Tensor:
        """One SGD step of every member; returns the losses [K] (detached)."""
        for t in self.params.values():
            t.grad = None
        losses = self.losses(x_in, target)
        losses.sum().backward()
        # autograd allocates new gradients each backward: point the optimizer at this step's
        self.opt.grads = [self.params[n].grad.view(self.K, *getattr(self.models[0], n).shape) for n in self.order]
        with torch.no_grad():
            self.opt.step(self.lr, self.mom, step)
        return losses.detach()

    @torch.no_grad()
    def sync_models(self) -> None:
        """Copy each member's tensors back into its ``AEModel``."""
        for n, t in self.params.items():
            for k, piece in enumerate(t.chunk(self.K)):
                getattr(self.models[k], n).copy_(piece)


def train_conv(xs: list[Tensor], cfgs: list[AEConfig], models: list[AEModel], names: list[str], batch_size: int,
               generators: list[torch.Generator], bar) -> list[list[dict]]:
    """Train K conv ``AEModel``s (initialised) together, member k on images ``xs[k]``
    [N, C, H, W] with its own config and generator (data order, noise); their parameters
    hold the result. Returns the per-epoch histories."""
    pop, K, n = ConvPopulation(models, cfgs), len(xs), xs[0].shape[0]
    draws = [device_generator(g, xs[0].device) for g in generators]
    mons = [monitor_subset(x) for x in xs]
    histories: list[list[dict]] = [[] for _ in xs]
    step = 0
    for epoch in range(1, cfgs[0].epochs + 1):
        t0 = time.perf_counter()
        total = torch.zeros(K, device=xs[0].device)
        perms = [torch.randperm(n, generator=g).to(x.device) for g, x in zip(generators, xs)]
        for i in range(0, n, batch_size):
            clean = [x.index_select(0, p[i : i + batch_size]) for x, p in zip(xs, perms)]
            noisy = [corrupt(c, cfg.noise_kind, cfg.noise, d) for c, cfg, d in zip(clean, cfgs, draws)]
            total += pop.step(torch.cat(noisy, 1), torch.cat(clean, 1), step) * clean[0].shape[0]
            step += 1
            bar.update(1)
        pop.sync_models()
        for k, model in enumerate(models):
            m = {"epoch": epoch, "loss": float(total[k]) / n, **model.monitor(mons[k]),
                 "seconds": round(time.perf_counter() - t0, 4)}
            check_finite(m["loss"], "loss", member_label(names[k], k, K), epoch)
            histories[k].append(m)
        bar.set_postfix(loss=f"{histories[0][-1]['loss']:.4g}")
    return histories
