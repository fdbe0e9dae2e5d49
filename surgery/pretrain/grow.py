"""Supervised greedy stacking, ``grow`` (Bengio et al. 2007), for K members at once.

Each stage puts a new layer on top of the stack so far under a fresh temporary softmax
head and trains with labels, either every layer so far (``train: all``) or only the new one
(``train: new``, the layers below frozen: their output is computed once). The K members'
networks train together through :class:`surgery.stacked.StackedChain` (one batched program,
each member with its own init, data order, lr, momentum and weight decay); K = 1 is the
single stack through the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..batched import RowGather, loops_on, member_tensor
from ..errors import ConfigError
from ..layers import InitName, init_weight
from ..stack import LayerStack, StackLayer
from ..stacked import StackedChain, StackedOptimizer
from .base import (
    LayerPretrainConfig,
    as_rows,
    check_finite,
    check_members,
    member_label,
    n_batches,
    pretrain_record,
    progress_bar,
    rows_once,
)

VALID_CHUNK = 2000  # validation rows per forward pass


class GrowConfig(LayerPretrainConfig):
    """``{method: grow, hidden, epochs, lr, momentum, train: all|new, identity_init, init}``."""

    method: Literal["grow"] = "grow"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    train: Literal["all", "new"] = Field(default="all", description="train every layer so far, or only the new one")
    identity_init: bool = Field(
        default=False,
        description="start the new layer as the identity (function-preserving for relu/linear; "
        "needs hidden equal to the layer below)",
    )
    init: InitName = Field(
        default="classic",
        description="how the new layer and its temporary head start: classic (Glorot uniform, x4 for "
        "sigmoid), xavier, he, sparse, or torch (uniform +-1/sqrt(fan-in), the 2007 papers' choice)",
    )


def _stage_layers(stack: LayerStack, cfg: GrowConfig, name: str, in_features: int, classes: int,
                  g: torch.Generator) -> tuple[list[Tensor], list[Tensor], list[str]]:
    """One member's network for this stage: weights, biases and activations of the layers
    below (``train: all``), the new layer and the head, initialised from ``g`` on the CPU."""
    below = stack.layers if cfg.train == "all" else []
    for layer in below:
        if layer.spec.kind != "dense":
            raise ConfigError(f"pretrain layer {name!r}: grow with train: all trains the layers below it, and "
                              f"{layer.name!r} is {layer.spec.kind}; use train: new on top of conv layers.")
    spec = cfg.spec_for((in_features,))
    new = torch.eye(cfg.hidden, in_features) if cfg.identity_init else \
        init_weight(torch.empty(spec.weight_shape), cfg.activation, cfg.init, spec, generator=g)
    head = init_weight(torch.empty(classes, cfg.hidden), "linear", cfg.init, generator=g)
    weights = [layer.tensors["weight"] for layer in below] + [new, head]
    biases = [layer.tensors["bias"] for layer in below] + [torch.zeros(cfg.hidden), torch.zeros(classes)]
    return weights, biases, [layer.spec.activation for layer in below] + [cfg.activation, "linear"]


def _stacked(per_member: list[list[Tensor]], device: torch.device) -> list[Tensor]:
    """Layer by layer, the members' tensors as one [K, ...] tensor, each block 64-byte aligned."""
    out = []
    for i in range(len(per_member[0])):
        t = member_tensor(len(per_member), tuple(per_member[0][i].shape), device)
        for k, member in enumerate(per_member):
            t[k].copy_(member[i])
        out.append(t)
    return out


def train_grow_population(x: Tensor, y: Tensor, inps: list[Tensor], stacks: list[LayerStack], cfgs: list[GrowConfig],
                          names: list[str], batch_size: int, gens: list[torch.Generator], progress: bool | None,
                          stacked: bool | None = None, valid: tuple[Tensor, Tensor] | None = None) -> list[StackLayer]:
    """One ``grow`` stage for K members: member k puts a new layer on ``stacks[k]`` (whose
    output for ``x`` is ``inps[k]``) and trains with labels ``y``; ``train: all`` also
    updates the tensors of the layers below in ``stacks[k]``. Returns the new layers.

    ``valid`` (inputs and labels, on ``x``'s device): the stage's last epoch also records its
    network's ``valid_error`` there (the depth-so-far net under its temporary head; what
    adding this layer did), which changes nothing trained."""
    check_members(cfgs, ("hidden", "activation", "epochs", "train", "identity_init"), names)
    K, dev, cfg = len(cfgs), x.device, cfgs[0]
    feats = rows_once([x] * K if cfg.train == "all" else inps)
    classes = int(y.max()) + 1
    nets = [_stage_layers(st, c, nm, rows_once([inp[:1]])[0].shape[1], classes, g)
            for st, c, nm, inp, g in zip(stacks, cfgs, names, inps, gens)]
    chain = StackedChain(_stacked([w for w, _, _ in nets], dev), _stacked([b for _, b, _ in nets], dev), nets[0][2],
                         loops_on(dev) if stacked is None else not stacked)
    layers = len(chain.W)
    opt = StackedOptimizer(chain.params, chain.grads, "sgd", [[1.0] * layers] * K, [c.weight_decay for c in cfgs])
    lr = torch.tensor([c.lr for c in cfgs], device=dev)
    mom = torch.tensor([c.momentum for c in cfgs], device=dev)
    score = _valid_scorer(chain, valid, stacks, cfg.train) if valid is not None and len(valid[1]) else None
    histories = _fit(chain, opt, lr, mom, RowGather(feats, chain.loop), y, gens, cfgs[0].epochs, batch_size,
                     names, progress, score)
    if cfg.train == "all":
        for k, st in enumerate(stacks):
            for i, layer in enumerate(st.layers):
                layer.tensors["weight"], layer.tensors["bias"] = chain.W[i][k].clone(), chain.b[i][k].clone()
                layer.pretrain.setdefault("updated_by", []).append(f"grow:{names[k]}")
    spec = cfg.spec_for((chain.W[-2].shape[2],))
    return [StackLayer(names[k], spec, {"weight": chain.W[-2][k].clone(), "bias": chain.b[-2][k].clone()},
                       pretrain_record("grow", c, batch_size, histories[k])) for k, c in enumerate(cfgs)]


def _valid_scorer(chain: StackedChain, valid: tuple[Tensor, Tensor], stacks: list[LayerStack],
                  train: str) -> Callable[[], Tensor]:
    """A function giving each member's error in percent [K] on ``valid`` as its chain is now.
    The chain's input is the data itself (``train: all``) or, with the layers below frozen
    (``train: new``), each member's features of it, computed once here."""
    vx, vy = valid
    shared = train == "all"
    feats = [as_rows(vx)] if shared else [as_rows(st.transform(vx)) if st.layers else as_rows(vx) for st in stacks]
    K = len(stacks)

    @torch.no_grad()
    def score() -> Tensor:
        wrong = torch.zeros(K, device=vy.device)
        for i in range(0, vy.shape[0], VALID_CHUNK):
            rows = [f[i : i + VALID_CHUNK] for f in feats]
            xb = rows[0].unsqueeze(0).expand(K, -1, -1) if shared else torch.stack(rows)
            wrong += (chain.forward(xb).argmax(2) != vy[i : i + VALID_CHUNK]).sum(1)
        return 100.0 * wrong / vy.shape[0]

    return score


def _fit(chain: StackedChain, opt: StackedOptimizer, lr: Tensor, mom: Tensor, gather: RowGather, y: Tensor,
         gens: list[torch.Generator], epochs: int, batch_size: int, names: list[str],
         progress: bool | None, score: Callable[[], Tensor] | None = None) -> list[list[dict]]:
    """SGD on the softmax cross-entropy for ``epochs``, each member over its own shuffle of
    its rows; returns each member's history (loss and running training error per epoch, and
    after the last epoch the validation error ``score`` gives)."""
    K, n, dev = len(gens), y.shape[0], y.device
    histories: list[list[dict]] = [[] for _ in range(K)]
    width = gather.xs[0].shape[1]
    bufs: dict[int, Tensor] = {}  # each batch size's gathered rows, reused every step
    label = f"{names[0]} grow" + (f" x{K}" if K > 1 else "")
    bar = progress_bar(epochs * n_batches(n, batch_size), label, progress)
    step = 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        total = torch.zeros(K, device=dev)
        wrong = torch.zeros(K, device=dev)
        perms = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(dev)
        for i in range(0, n, batch_size):
            idx = perms[:, i : i + batch_size]
            b = idx.shape[1]
            if b not in bufs:
                bufs[b] = torch.empty(K, b, width, device=dev)
            xb = gather(idx, bufs[b])
            yb = y[idx]
            keep: list = []
            out = chain.forward(xb, keep)
            losses = chain.backward(out, yb, keep)
            opt.step(lr, mom, step)
            step += 1
            total += losses * idx.shape[1]
            wrong += (out.argmax(2) != yb).sum(1)
            bar.update(1)
        seconds = round(time.perf_counter() - t0, 4)
        valid = score().tolist() if score is not None and epoch == epochs else None  # once a stage: cheap
        for k in range(K):
            m = {"epoch": epoch, "loss": float(total[k]) / n, "train_error": 100.0 * float(wrong[k]) / n,
                 **({"valid_error": valid[k]} if valid is not None else {}), "seconds": seconds}
            check_finite(m["loss"], "loss", member_label(names[k], k, K), epoch)
            histories[k].append(m)
        bar.set_postfix(loss=f"{histories[0][-1]['loss']:.4g}")
    bar.close()
    return histories
