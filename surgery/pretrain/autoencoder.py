"""Training autoencoder layers: plain, denoising, sparse and convolutional.

Dense layers train with the hand-written gradients of :mod:`.dense_ae`; conv layers as
grouped convolutions with autograd (:mod:`.conv_ae`); see :mod:`.ae_model` for the model
and its config. The plain autograd loop here (``_autograd=True``) is the reference the
tests compare both against.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ..configs import as_config, as_tensor
from ..dataset import epoch_batches
from ..errors import ShapeError
from ..runtime import keep_freed_memory
from ..schedules import OptimizerConfig, build_optimizer
from ..stack import StackLayer
from .ae_model import AEConfig, AEModel
from .base import (
    check_examples,
    check_finite,
    check_input,
    check_members,
    device_generator,
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
from .conv_ae import train_conv
from .dense_ae import train_dense
from .sampling import corrupt


def train_autoencoder(x: Tensor, cfg: AEConfig | dict[str, Any], name: str = "h1", batch_size: int | None = None,
                      generator: torch.Generator | None = None, progress: bool | None = None,
                      _autograd: bool = False) -> StackLayer:
    """Fit one autoencoder layer on ``x`` ([N, D], or [N, C, H, W] for conv_ae): a population of one.
    ``batch_size`` defaults to ``cfg.batch_size``, else 100; ``generator`` (init, data order,
    noise) to one seeded with 0.

    Dense layers train with hand-written gradients (:mod:`.dense_ae`), conv layers as
    grouped convolutions (:mod:`.conv_ae`); ``_autograd=True``: one member at a time with
    autograd and ``torch.optim.SGD``, the reference the tests compare against. ``cfg`` may be a
    dict of AEConfig's fields (method ``ae`` unless it says)."""
    cfg = as_config({"method": "ae", **cfg} if isinstance(cfg, dict) else cfg, AEConfig,
                    "surgery.train_autoencoder(x, cfg)")
    x = as_tensor(x, "surgery.train_autoencoder(x, cfg)")
    check_input(name, cfg, x)
    return train_autoencoder_population([x], [cfg], [name], layer_batch(batch_size, cfg),
                                        [generator or new_generator(0)], progress, _autograd=_autograd)[0]


def train_autoencoder_population(xs: list[Tensor], cfgs: list[AEConfig], names: list[str], batch_size: int,
                                 generators: list[torch.Generator], progress: bool | None = None,
                                 stacked: bool | None = None, capture: bool = True, ahead: bool | None = None,
                                 _autograd: bool = False) -> list[StackLayer]:
    """Fit K autoencoder layers together, member k on ``xs[k]`` with ``cfgs[k]`` and its own
    generator (init, data order, noise); each comes out as it would alone.

    Members share the method, shape, activation, tying, loss and noise kind; lr, momentum,
    weight decay, noise level and sparsity may differ. Dense members train as one batched
    program (:func:`.dense_ae.train_dense`, its step replayed from a CUDA graph on a GPU
    when ``capture``), conv members as one grouped convolution (:func:`.conv_ae.train_conv`)."""
    check_members(cfgs, ("method", "hidden", "epochs", "activation", "tied", "loss", "noise_kind"), names)
    check_examples(xs, names, batch_size)
    cfg = cfgs[0]
    if cfg.method == "conv_ae" and xs[0].dim() != 4:
        raise ShapeError(
            f"layer {names[0]!r}: conv_ae needs image input [N, C, H, W] but got {tuple(xs[0].shape)}; "
            "set data.flatten: false and put conv layers first"
        )
    xs = rows_once(xs) if cfg.method != "conv_ae" else [x.contiguous() for x in xs]
    spec = cfg.spec_for(tuple(xs[0].shape[1:]))
    dev = xs[0].device
    models = [AEModel(spec, c, tuple(xs[0].shape[1:]), g).to(dev) for c, g in zip(cfgs, generators)]
    if dev.type == "cpu":
        keep_freed_memory()
    n, K = xs[0].shape[0], len(xs)
    label = f"{names[0]} {cfg.method}" + (f" x{K}" if K > 1 else "")
    bar = progress_bar(cfg.epochs * n_batches(n, batch_size) * (K if _autograd else 1), label, progress)
    if spec.kind == "dense" and not _autograd:
        histories = train_dense(xs, cfgs, models, names, batch_size, generators, bar, stacked, capture, ahead)
    elif not _autograd:
        histories = train_conv(xs, cfgs, models, names, batch_size, generators, bar)
    else:
        histories = [_train_autograd(x, c, m, monitor_subset(x), member_label(name, k, K), batch_size, g, bar)
                     for k, (x, c, m, name, g) in enumerate(zip(xs, cfgs, models, names, generators))]
    bar.close()
    for k, (c, h) in enumerate(zip(cfgs, histories)):
        warn_inactive(h, member_label(names[k], k, K), c.lr)
    return [_layer(m, spec, c, name, batch_size, h) for m, c, name, h in zip(models, cfgs, names, histories)]


def _layer(model: AEModel, spec, cfg: AEConfig, name: str, batch_size: int, history: list[dict]) -> StackLayer:
    """The trained encoder (and decoder weights) as a stack layer with its record."""
    tensors = {"weight": model.weight.detach(), "bias": model.bias.detach(),
               "visible_bias": model.visible_bias.detach()}
    if model.decoder_weight is not None:
        tensors["decoder_weight"] = model.decoder_weight.detach()
    return StackLayer(name, spec, tensors, pretrain_record(cfg.method, cfg, batch_size, history))


def _train_autograd(x: Tensor, cfg: AEConfig, model: AEModel, mon: Tensor, name: str, batch_size: int,
                    generator: torch.Generator, bar) -> list[dict]:
    dev = x.device
    g = device_generator(generator, dev)
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
        m = {"epoch": epoch, "loss": float(total) / x.shape[0], **model.monitor(mon),
             "seconds": round(time.perf_counter() - t0, 4)}
        check_finite(m["loss"], "loss", name, epoch)
        history.append(m)
        bar.set_postfix(loss=f"{m['loss']:.4g}")
    return history
