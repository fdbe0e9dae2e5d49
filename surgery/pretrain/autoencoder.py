"""Training autoencoder layers: plain, denoising, sparse and convolutional.

Dense layers train with the hand-written gradients of :mod:`.dense_ae`; conv layers with
autograd (see :mod:`.ae_model` for the model and its config).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..data import epoch_batches
from ..errors import ShapeError
from ..runtime import keep_freed_memory
from ..schedules import OptimizerConfig, build_optimizer
from ..stack import StackLayer
from .ae_model import AEConfig, AEModel
from .base import (
    as_rows,
    check_finite,
    monitor_subset,
    n_batches,
    pretrain_record,
    progress_bar,
)
from .dense_ae import train_dense
from .sampling import corrupt


def train_autoencoder(x: Tensor, cfg: AEConfig, name: str, batch_size: int,
                      generator: torch.Generator, progress: bool | None = None,
                      _autograd: bool = False) -> StackLayer:
    """Fit one autoencoder layer on ``x`` ([N, D], or [N, C, H, W] for conv_ae).

    Dense layers train with hand-written gradients (:mod:`.dense_ae`); conv layers (and
    dense ones with ``_autograd=True``, which the tests compare against) with autograd."""
    if cfg.method == "conv_ae" and x.dim() != 4:
        raise ShapeError(
            f"layer {name!r}: conv_ae needs image input [N, C, H, W] but got {tuple(x.shape)}; "
            "set data.flatten: false and put conv layers first"
        )
    if cfg.method != "conv_ae":
        x = as_rows(x)
    spec = cfg.spec_for(tuple(x.shape[1:]))
    x = x.contiguous()
    dev = x.device
    model = AEModel(spec, cfg, tuple(x.shape[1:]), generator).to(dev)
    if dev.type == "cpu":
        keep_freed_memory()
    mon = monitor_subset(x)
    n = x.shape[0]
    bar = progress_bar(cfg.epochs * n_batches(n, batch_size), f"{name} {cfg.method}", progress)
    if spec.kind == "dense" and not _autograd:
        history = train_dense(x, cfg, model, mon, name, batch_size, generator, bar)
    else:
        history = _train_autograd(x, cfg, model, mon, name, batch_size, generator, bar)
    bar.close()
    tensors = {"weight": model.weight.detach(), "bias": model.bias.detach(),
               "visible_bias": model.visible_bias.detach()}
    if model.decoder_weight is not None:
        tensors["decoder_weight"] = model.decoder_weight.detach()
    return StackLayer(name, spec, tensors, pretrain_record(cfg.method, cfg, batch_size, history))


def _train_autograd(x: Tensor, cfg: AEConfig, model: AEModel, mon: Tensor, name: str, batch_size: int,
                    generator: torch.Generator, bar) -> list[dict]:
    dev = x.device
    g = generator if dev.type == "cpu" else None
    opt = build_optimizer(OptimizerConfig(name="sgd", lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
                          [{"params": list(model.parameters())}])
    history = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        total = torch.zeros((), device=dev)
        for xb, _ in epoch_batches(x, None, batch_size, generator):
            loss = model.loss(corrupt(xb, cfg.noise_kind, cfg.noise, g), xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * xb.shape[0]
            bar.update(1)
        m = {"epoch": epoch, "loss": float(total) / x.shape[0], "recon_error": model.recon_error(mon),
             "seconds": round(time.perf_counter() - t0, 4)}
        check_finite(m["loss"], "loss", name, epoch)
        history.append(m)
        bar.set_postfix(loss=f"{m['loss']:.4g}")
    return history
