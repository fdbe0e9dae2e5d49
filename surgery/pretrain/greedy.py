"""Greedy layer-wise stacking: train layer 1 on the data, map the data through it, train
layer 2 on that, and so on. Any mix of methods per layer.

``grow`` is the supervised variant (Bengio et al. 2007): each stage puts a new layer on
top of the stack so far under a fresh temporary softmax head and trains with labels,
either every layer so far (``train: all``) or only the new one (``train: new``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from ..configs import as_config, as_tensor
from ..errors import ConfigError, DataError, SurgeryError
from ..io import duration, progress_line
from ..stack import LayerStack, StackLayer
from .ae_model import AEConfig
from .autoencoder import train_autoencoder_population
from .base import DEFAULT_BATCH, check_input, new_generator, takes_probabilities
from .grow import GrowConfig, train_grow_population
from .rbm import RBMConfig, train_rbm_population

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

    batch_size: int = Field(default=DEFAULT_BATCH, gt=0)
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
            below = self.layers[i - 1] if i else None
            if below is not None and below.activation != "sigmoid" and takes_probabilities(lc):
                fix = "method: grbm (real-valued inputs)" if lc.method == "rbm" else \
                    f"loss: squared (an experiment's arm: experiment.methods.{lc.method}.loss)"
                raise ValueError(f"layers[{i}] ({lc.method}{'' if lc.method == 'rbm' else ', loss cross_entropy'}) "
                                 f"takes probabilities in [0, 1], but layer {names[i - 1]!r} below it gives "
                                 f"{below.activation} outputs; use {fix}, or make {names[i - 1]!r} sigmoid")
            if lc.method == "grow" and lc.train == "all" and any(p.method == "conv_ae" for p in self.layers[:i]):
                raise ValueError(f"layers[{i}]: grow with train: all trains the layers below it, and conv_ae "
                                 "layers cannot be; use train: new")
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
        except (ValueError, SurgeryError) as e:  # a layer too big to hold is an OutOfMemory, kept one
            raise (type(e) if isinstance(e, SurgeryError) else ValueError)(f"pretrain.layers[{i}]: {e}") from e
        tensors = {"weight": torch.zeros(spec.weight_shape), "bias": torch.zeros(spec.out_features)}
        stack.append(StackLayer(cfg.layer_name(i), spec, tensors, {"method": lc.method, "epochs": lc.epochs}))
        shape = spec.output_shape
    return stack


def greedy_pretrain(
    x: Tensor,
    cfg: PretrainConfig | dict[str, Any],
    seed: int = 0,
    y: Tensor | None = None,
    progress: bool | None = None,
    data_fingerprint: str | None = None,
    on_layer: Callable[[int, LayerStack, Tensor], None] | None = None,
    valid: tuple[Tensor, Tensor] | None = None,
    start: tuple[LayerStack, Tensor] | None = None,
) -> LayerStack:
    """Train ``cfg.layers`` one after another on ``x`` and return the stack (a population of one).

    ``x``: [N, D] or [N, C, H, W] on the training device; ``y``: int64 [N] labels, needed
    only by ``grow`` layers. ``on_layer(i, stack, rng)`` runs after layer ``i`` with the
    generator's state then; ``start`` (a stack's first layers and that state) continues
    from there, making the stack an uninterrupted run makes. ``valid`` (inputs, labels):
    ``grow`` layers record the validation error of each stage's network after its last
    epoch (it trains nothing)."""

    def each(i: int, stacks: list[LayerStack], rngs: list[Tensor]) -> None:
        if on_layer is not None:
            on_layer(i, stacks[0], rngs[0])

    cfg = as_config(cfg, PretrainConfig, "surgery.greedy_pretrain(x, cfg)")
    return greedy_pretrain_population(as_tensor(x, "surgery.greedy_pretrain(x, cfg)"), [cfg], [seed],
                                      None if y is None else as_tensor(y, "surgery.greedy_pretrain(y=...)"),
                                      progress, data_fingerprint, each, valid=valid,
                                      start=None if start is None else [start])[0]


def _final_metrics(layers: list) -> str:
    """The layers' last reconstruction error and inactive units for a log line: one
    member's values, or the members' range (``1.9-2.1``)."""
    finals = [layer.pretrain.get("final", {}) for layer in layers]

    def span(key: str, fmt: str) -> str | None:
        if not all(key in f for f in finals):
            return None
        lo, hi = (fmt.format(v) for v in (min(f[key] for f in finals), max(f[key] for f in finals)))
        return lo if lo == hi else f"{lo}-{hi}"

    recon, inactive = span("recon_error", "{:.4g}"), span("inactive_units", "{:.1%}")
    valid = span("valid_error", "{:.2f}%")
    return (f", recon_error {recon}" if recon else "") + (f", {inactive} of units inactive" if inactive else "") \
        + (f", validation error {valid} (the net so far)" if valid else "")


def greedy_pretrain_population(
    x: Tensor,
    cfgs: list[PretrainConfig],
    seeds: list[int],
    y: Tensor | None = None,
    progress: bool | None = None,
    data_fingerprint: str | None = None,
    on_layer: Callable[[int, list[LayerStack], list[Tensor]], None] | None = None,
    stacked: bool | None = None,
    valid: tuple[Tensor, Tensor] | None = None,
    start: list[tuple[LayerStack, Tensor]] | None = None,
) -> list[LayerStack]:
    """Greedy stacks of K members on the same data, trained together layer by layer: member
    k with ``cfgs[k]`` (its own lr, momentum, decay, noise...) and its own ``seeds[k]``
    (init, data order, samples); each stack equals the one :func:`greedy_pretrain` makes
    alone. Every method's layers train as one batched program (RBM, dense autoencoder and
    ``grow``: stacked matrices; conv autoencoder: a grouped convolution).
    ``on_layer``, ``start`` and ``valid`` as for :func:`greedy_pretrain`, a member each
    (every ``start`` stack as deep as the others)."""
    _check_same_plan(cfgs)
    progress = cfgs[0].progress if progress is None else progress
    gens = [new_generator(s) for s in seeds]
    if start is None:
        stacks = [LayerStack(info={"seed": s, "data_fingerprint": data_fingerprint, "n_train": int(x.shape[0])})
                  for s in seeds]
        inps = [x] * len(cfgs)
    else:
        stacks, inps = _continued(start, gens, x, len(cfgs[0].layers))
    for i in range(len(stacks[0]), len(cfgs[0].layers)):
        lcs = [c.layers[i] for c in cfgs]
        names = [c.layer_name(i) for c in cfgs]
        bs = lcs[0].batch_size or cfgs[0].batch_size
        _check_inputs(i, lcs, names, inps, y)
        t0 = time.perf_counter()
        if lcs[0].method == "grow":
            layers = train_grow_population(x, y, inps, stacks, lcs, names, bs, gens, progress, stacked, valid)
        else:
            layers = POPULATION_TRAINERS[lcs[0].method](inps, lcs, names, bs, gens, progress, stacked)
        wall = time.perf_counter() - t0
        seconds = round(wall / len(cfgs), 3)  # each member's share
        for k, layer in enumerate(layers):
            layer.pretrain["seconds"] = seconds
            layer.pretrain["data_fingerprint"] = data_fingerprint
            stacks[k].append(layer)
            if i + 1 < len(cfgs[0].layers):
                grown = lcs[k].method == "grow" and lcs[k].train == "all"
                inps[k] = stacks[k].transform(x) if grown else layer.transform(inps[k])  # grow: all layers changed
        who = f", {len(cfgs)} members" if len(cfgs) > 1 else ""
        progress_line(progress, f"pretrain: layer {i + 1}/{len(cfgs[0].layers)} ({lcs[0].method}, {lcs[0].hidden} "
                                f"units{who}) in {duration(wall)}{_final_metrics(layers)}")
        if on_layer is not None:
            on_layer(i, stacks, [g.get_state() for g in gens])
    return stacks


def _check_inputs(i: int, lcs: list[LayerConfig], names: list[str], inps: list[Tensor], y: Tensor | None) -> None:
    """``DataError`` before layer ``i`` trains when its input holds NaN or infinite values, or
    when a Bernoulli RBM's lies outside [0, 1] (its visible units are probabilities), or
    when supervised ``grow`` has labels ``y`` that are not class numbers, one an example;
    ``ConfigError`` for ``grow`` without them."""
    if lcs[0].method == "grow":
        if y is None:
            raise ConfigError(f"pretrain.layers[{i}]: grow is supervised and needs labels (y)")
        _check_labels(y, inps[0].shape[0], f"pretrain.layers[{i}] (grow)")
    seen: set[int] = set()
    for lc, name, inp in zip(lcs, names, inps):
        if id(inp) not in seen:  # members of a population share the data
            seen.add(id(inp))
            check_input(name, lc, inp)


def _check_labels(y: Tensor, n: int, where: str) -> None:
    """``DataError`` unless ``y`` holds ``n`` int64 class numbers, none negative."""
    if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != n:
        raise DataError(f"{where}: its labels y are {y.dtype} of shape {tuple(y.shape)} for {n} examples; give "
                        "one int64 class number per example, y of shape [N] (y.long(); not one-hot).")
    if n and int(y.min()) < 0:
        raise DataError(f"{where}: its labels y include {int(y.min())}; classes are numbered 0, 1, 2, ...")


def _continued(start: list[tuple[LayerStack, Tensor]], gens: list[torch.Generator], x: Tensor,
               layers: int) -> tuple[list[LayerStack], list[Tensor]]:
    """The members' stacks so far and their next layer's inputs, each generator put back
    in the state it had after them."""
    depths = [len(st) for st, _ in start]
    if len(start) != len(gens) or len(set(depths)) != 1 or depths[0] > layers:
        raise ValueError(f"start: stacks of depths {depths} for {len(gens)} members of {layers} layers")
    for g, (_, rng) in zip(gens, start):
        g.set_state(rng)
    return [st for st, _ in start], [st.transform(x) if depths[0] < layers else x for st, _ in start]


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
