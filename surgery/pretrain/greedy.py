"""Greedy layer-wise stacking: train layer 1 on the data, map the data through it, train
layer 2 on that, and so on. Any mix of methods per layer.

``grow`` is the supervised variant (Bengio et al. 2007): each stage puts a new layer on
top of the stack so far under a fresh temporary softmax head and trains with labels,
either every layer so far (``train: all``) or only the new one (``train: new``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from ..data import epoch_batches
from ..layers import init_weight
from ..stack import LayerStack, StackLayer
from .ae_model import AEConfig
from .autoencoder import train_autoencoder_population
from .base import (
    LayerPretrainConfig,
    as_rows,
    check_finite,
    n_batches,
    new_generator,
    pretrain_record,
    progress_bar,
)
from .rbm import RBMConfig, train_rbm_population


class GrowConfig(LayerPretrainConfig):
    """``{method: grow, hidden, epochs, lr, momentum, train: all|new, identity_init}``."""

    method: Literal["grow"] = "grow"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    train: Literal["all", "new"] = Field(default="all", description="train every layer so far, or only the new one")
    identity_init: bool = Field(
        default=False,
        description="start the new layer as the identity (function-preserving for relu/linear; "
        "needs hidden equal to the layer below)",
    )



LayerConfig = Annotated[RBMConfig | AEConfig | GrowConfig, Field(discriminator="method")]

METHODS = ("rbm", "grbm", "ae", "dae", "sparse_ae", "conv_ae", "grow")

# The unsupervised layer trainers by method, for K members at once; ``grow`` needs labels
# and the stack so far, so greedy_pretrain_population runs it itself.
POPULATION_TRAINERS: dict[str, Callable[..., list[StackLayer]]] = {
    "rbm": train_rbm_population, "grbm": train_rbm_population,
    **{m: train_autoencoder_population for m in ("ae", "dae", "sparse_ae", "conv_ae")},
}


class PretrainConfig(BaseModel):
    """The ``pretrain:`` recipe section: a default batch size and one entry per layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(default=100, gt=0)
    layers: list[LayerConfig] = Field(min_length=1)
    progress: bool | None = Field(default=None, description="progress bars (default: only on a terminal)")

    @model_validator(mode="after")
    def _names_and_order(self) -> PretrainConfig:
        names = [lc.name or f"h{i + 1}" for i, lc in enumerate(self.layers)]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"layer names must be unique; {sorted(dup)} repeat")
        for i, lc in enumerate(self.layers):
            if lc.method == "conv_ae" and any(p.method != "conv_ae" for p in self.layers[:i]):
                raise ValueError(f"layers[{i}]: a conv_ae layer cannot follow a dense layer")
            if lc.method == "grow" and lc.identity_init and i == 0:
                raise ValueError("layers[0]: identity_init needs a layer below it")
            if lc.method == "grow" and lc.identity_init and self.layers[i - 1].hidden != lc.hidden:
                raise ValueError(
                    f"layers[{i}].identity_init: hidden={lc.hidden} must equal the layer below "
                    f"({self.layers[i - 1].hidden})"
                )
        return self

    def layer_name(self, i: int) -> str:
        """The name of layer ``i``: its ``name``, else ``h<i+1>``."""
        return self.layers[i].name or f"h{i + 1}"


def plan_stack(cfg: PretrainConfig, input_shape: tuple[int, ...]) -> LayerStack:
    """The stack ``cfg`` would make, with zero tensors: for shape checks before training."""
    stack = LayerStack(info={"plan": True})
    shape = tuple(input_shape)
    for i, lc in enumerate(cfg.layers):
        try:
            spec = lc.spec_for(shape)
        except ValueError as e:
            raise ValueError(f"pretrain.layers[{i}]: {e}") from e
        tensors = {"weight": torch.zeros(spec.weight_shape), "bias": torch.zeros(spec.out_features)}
        stack.append(StackLayer(cfg.layer_name(i), spec, tensors, {"method": lc.method, "epochs": lc.epochs}))
        shape = spec.output_shape
    return stack


def greedy_pretrain(
    x: Tensor,
    cfg: PretrainConfig,
    seed: int = 0,
    y: Tensor | None = None,
    progress: bool | None = None,
    data_fingerprint: str | None = None,
    on_layer: Callable[[int, LayerStack], None] | None = None,
) -> LayerStack:
    """Train ``cfg.layers`` one after another on ``x`` and return the stack (a population of one).

    ``x``: [N, D] or [N, C, H, W] on the training device; ``y``: int64 [N] labels, needed
    only by ``grow`` layers. ``on_layer(i, stack)`` runs after layer ``i``."""

    def each(i: int, stacks: list[LayerStack]) -> None:
        if on_layer is not None:
            on_layer(i, stacks[0])

    return greedy_pretrain_population(x, [cfg], [seed], y, progress, data_fingerprint, each)[0]


def greedy_pretrain_population(
    x: Tensor,
    cfgs: list[PretrainConfig],
    seeds: list[int],
    y: Tensor | None = None,
    progress: bool | None = None,
    data_fingerprint: str | None = None,
    on_layer: Callable[[int, list[LayerStack]], None] | None = None,
    stacked: bool | None = None,
) -> list[LayerStack]:
    """Greedy stacks of K members on the same data, trained together layer by layer: member
    k with ``cfgs[k]`` (its own lr, momentum, decay, noise...) and its own ``seeds[k]``
    (init, data order, samples); each stack equals the one :func:`greedy_pretrain` makes
    alone. RBM and dense autoencoder layers train as one batched program; ``grow`` and
    conv layers one member after another. ``on_layer(i, stacks)`` runs after layer ``i``."""
    _check_same_plan(cfgs)
    progress = cfgs[0].progress if progress is None else progress
    gens = [new_generator(s) for s in seeds]
    stacks = [LayerStack(info={"seed": s, "data_fingerprint": data_fingerprint, "n_train": int(x.shape[0])})
              for s in seeds]
    inps = [x] * len(cfgs)
    for i in range(len(cfgs[0].layers)):
        lcs = [c.layers[i] for c in cfgs]
        names = [c.layer_name(i) for c in cfgs]
        bs = lcs[0].batch_size or cfgs[0].batch_size
        t0 = time.perf_counter()
        if lcs[0].method == "grow":
            if y is None:
                raise ValueError(f"pretrain.layers[{i}]: grow is supervised and needs labels")
            layers = [_grow_stage(x, y, inp, st, lc, name, bs, g, progress)
                      for inp, st, lc, name, g in zip(inps, stacks, lcs, names, gens)]
        else:
            layers = POPULATION_TRAINERS[lcs[0].method](inps, lcs, names, bs, gens, progress, stacked)
        seconds = round((time.perf_counter() - t0) / len(cfgs), 3)  # each member's share
        for k, layer in enumerate(layers):
            layer.pretrain["seconds"] = seconds
            layer.pretrain["data_fingerprint"] = data_fingerprint
            stacks[k].append(layer)
            if i + 1 < len(cfgs[0].layers):
                grown = lcs[k].method == "grow" and lcs[k].train == "all"
                inps[k] = stacks[k].transform(x) if grown else layer.transform(inps[k])  # grow: all layers changed
        if on_layer is not None:
            on_layer(i, stacks)
    return stacks


def _check_same_plan(cfgs: list[PretrainConfig]) -> None:
    """``ConfigError`` unless the members' stacks have the same layers in the same order,
    each trained with the same method and batch size."""
    from ..errors import ConfigError

    def plan(c: PretrainConfig) -> list[tuple[str, int]]:
        return [(lc.method, lc.batch_size or c.batch_size) for lc in c.layers]

    for k, c in enumerate(cfgs):
        if plan(c) != plan(cfgs[0]):
            raise ConfigError(f"pretraining population member {k}: its layers (method, batch size) {plan(c)} differ "
                              f"from member 0's {plan(cfgs[0])}; members train together layer by layer.")


def _grow_stage(x: Tensor, y: Tensor, inp: Tensor, stack: LayerStack, cfg: GrowConfig, name: str,
                batch_size: int, g: torch.Generator, progress: bool | None) -> StackLayer:
    """Put a new layer on the stack under a fresh head and train with labels."""
    dev = x.device
    below = [layer.module().to(dev) for layer in stack.layers] if cfg.train == "all" else []
    feats = x if cfg.train == "all" else inp  # frozen layers: their output once, not every step
    in_features = as_rows(inp[:1]).shape[1]
    spec = cfg.spec_for((in_features,))
    new = spec.build().to(dev)
    with torch.no_grad():
        if cfg.identity_init:
            new.weight.copy_(torch.eye(cfg.hidden, in_features))
        else:
            init_weight(new.weight, cfg.activation, "classic", spec, generator=g)
    classes = int(y.max()) + 1
    head = torch.nn.Linear(cfg.hidden, classes).to(dev)
    with torch.no_grad():
        init_weight(head.weight, "linear", "classic", generator=g)
        head.bias.zero_()
    net = torch.nn.Sequential(*below, new, head)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    history = []
    n = x.shape[0]
    bar = progress_bar(cfg.epochs * n_batches(n, batch_size), f"{name} grow", progress)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        total = torch.zeros((), device=dev)
        wrong = torch.zeros((), device=dev, dtype=torch.long)
        for xb, yb in epoch_batches(feats, y, batch_size, g):
            out = net(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * xb.shape[0]
            wrong += (out.argmax(1) != yb).sum()
            bar.update(1)
        m = {"epoch": epoch, "loss": float(total) / n, "train_error": 100.0 * float(wrong) / n,
             "seconds": round(time.perf_counter() - t0, 4)}
        check_finite(m["loss"], "loss", name, epoch)
        history.append(m)
        bar.set_postfix(loss=f"{m['loss']:.4g}")
    bar.close()
    with torch.no_grad():
        for layer, mod in zip(stack.layers, below):
            layer.tensors["weight"] = mod.weight.detach().clone()
            layer.tensors["bias"] = mod.bias.detach().clone()
            layer.pretrain.setdefault("updated_by", []).append(f"grow:{name}")
    tensors = {"weight": new.weight.detach().clone(), "bias": new.bias.detach().clone()}
    return StackLayer(name, spec, tensors, pretrain_record("grow", cfg, batch_size, history))
