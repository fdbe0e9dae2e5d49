"""What every layer pretrainer shares: the common config fields and the progress bar."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ..dataset import non_finite
from ..errors import ConfigError, DataError, ShapeError, SurgeryWarning, TrainingDiverged
from ..io import progress_bar as _bar
from ..layers import Activation, LayerSpec


class LayerPretrainConfig(BaseModel):
    """Fields shared by every ``pretrain.layers[i]`` entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden: int = Field(gt=0, description="units (dense) or feature maps (conv) of this layer")
    epochs: int = Field(default=10, ge=0)
    lr: float = Field(default=0.1, gt=0, le=100)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int | None = Field(default=None, gt=0, description="defaults to pretrain.batch_size")
    activation: Activation = "sigmoid"
    name: str | None = Field(default=None, description="layer name; defaults to h<i+1>")

    def spec_for(self, in_shape: tuple[int, ...]) -> LayerSpec:
        """The layer this entry makes from input of per-example shape ``in_shape``."""
        return LayerSpec(in_features=math.prod(in_shape), out_features=self.hidden, activation=self.activation)

    def hyperparameters(self) -> dict[str, Any]:
        """The entry's fields as recorded in the stack manifest."""
        return self.model_dump(mode="json", exclude={"name"})


DEFAULT_BATCH = 100  # pretrain.batch_size's default, for a layer trained on its own


def layer_batch(batch_size: int | None, cfg: LayerPretrainConfig) -> int:
    """A layer trained on its own: ``batch_size`` as given, else its config's, else the default."""
    if batch_size is not None:
        return batch_size
    return cfg.batch_size if cfg.batch_size is not None else DEFAULT_BATCH


def progress_bar(total: int, desc: str, progress: bool | None):
    """A per-layer bar over batches; ``progress=None`` shows it only on a terminal."""
    return _bar(total, desc, progress, unit="batch")


def n_batches(n: int, batch_size: int) -> int:
    """Batches in an epoch of ``n`` examples."""
    return math.ceil(n / batch_size)


def monitor_subset(x: Tensor, n: int = 1000) -> Tensor:
    """A fixed slice of the input to compute per-epoch metrics on."""
    return x[: min(n, x.shape[0])]


def check_finite(value: float, what: str, layer: str, epoch: int) -> None:
    """Raise ``TrainingDiverged`` naming the layer and epoch when ``value`` is NaN or infinite."""
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"pretraining layer {layer!r}: {what} became {value} in epoch {epoch}; lower its lr "
            "(or standardize the data for grbm) and run again."
        )


INACTIVE_STD = 0.02  # a unit whose output varies less than this over the monitor rows carries nothing ...
SATURATED = 0.05  # ... when it also sits within this of 0 or 1 (stuck off or on, not merely untrained)
INACTIVE_WARN = 0.5  # warn when more than this fraction of a layer's units ends inactive


def inactive_fraction(h: Tensor) -> float:
    """The fraction of sigmoid hidden units (columns of ``h``, one row per example) stuck off
    or on: nearly the same output for every example (std < ``INACTIVE_STD``), within
    ``SATURATED`` of 0 or 1. They pass nothing to the layer above, and their gradient is
    too small to bring them back. (Units still near their initial 0.5 do not count.)"""
    if h.shape[0] < 2:
        return 0.0
    mean = h.mean(0)
    stuck = (h.std(0) < INACTIVE_STD) & (torch.minimum(mean, 1 - mean) < SATURATED)
    return float(stuck.float().mean())


def warn_inactive(history: list[dict[str, Any]], layer: str, lr: float) -> None:
    """A :class:`SurgeryWarning` when most of a layer's units ended inactive (a collapsed layer:
    typically a learning rate too high for its width)."""
    frac = history[-1].get("inactive_units", 0.0) if history else 0.0
    if frac > INACTIVE_WARN:
        warnings.warn(f"pretraining layer {layer!r}: {frac:.0%} of its hidden units ended inactive (the same "
                      f"output for every example), so the layer passes little upward; a lower lr than {lr:g} "
                      "usually keeps them alive (see inactive_units in its history).", SurgeryWarning, stacklevel=2)


def as_rows(x: Tensor) -> Tensor:
    """Flatten images [N, C, H, W] to rows [N, C*H*W]; rows stay as they are."""
    return x.flatten(1) if x.dim() > 2 else x


def check_examples(xs: list[Tensor], names: list[str], batch_size: int) -> None:
    """Before a layer pretrains: ``batch_size`` >= 1 (``ConfigError``) and each member's input
    ``xs[k]`` float32 examples [N, ...] with at least one, all of one shape (``DataError``,
    ``ShapeError``), each error naming the layer."""
    if batch_size < 1:
        raise ConfigError(f"layer {names[0]!r}: batch_size {batch_size}; give at least 1 example a batch.")
    for x, name in zip(xs, names):
        if x.dtype != torch.float32:
            raise DataError(f"layer {name!r}: its input is {x.dtype}; pretraining takes float32 examples "
                            "(convert with x.float()).")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ShapeError(f"layer {name!r}: its input has shape {tuple(x.shape)}; give examples [N, D] (or "
                             "images [N, C, H, W]) with N >= 1.")
        if x.shape != xs[0].shape:
            raise ShapeError(f"layer {name!r}: its input has shape {tuple(x.shape)} but {names[0]!r}'s has "
                             f"{tuple(xs[0].shape)}; the members of a population train on inputs of one shape.")
    if batch_size > xs[0].shape[0]:
        warnings.warn(f"layer {names[0]!r}: batch_size {batch_size} is more than its {xs[0].shape[0]} examples; "
                      f"each epoch is one step on all {xs[0].shape[0]}.", SurgeryWarning, stacklevel=3)


def takes_probabilities(cfg: LayerPretrainConfig) -> bool:
    """Whether the layer's inputs must lie in [0, 1]: a Bernoulli RBM's visible units, or an
    autoencoder whose cross-entropy loss reads them as probabilities (on a target above 1 or
    below 0 that loss has no minimum: its decoder's outputs grow until the loss is NaN)."""
    return cfg.method == "rbm" or getattr(cfg, "loss", None) == "cross_entropy"


def check_input(name: str, cfg: LayerPretrainConfig, x: Tensor) -> None:
    """``DataError`` when ``x``, the input of layer ``name``, holds NaN or infinite values, or
    lies outside [0, 1] where the layer takes probabilities (:func:`takes_probabilities`)."""
    bad = non_finite(x)
    if bad:
        raise DataError(f"pretraining layer {name!r}: its input holds {bad} NaN or infinite values; every "
                        "example must be finite (clean the data) before pretraining.")
    if not takes_probabilities(cfg) or not x.numel():
        return
    lo, hi = (float(v) for v in torch.aminmax(x))
    if lo < 0 or hi > 1:
        what, fix = (("a Bernoulli RBM takes probabilities", "method: grbm") if cfg.method == "rbm" else
                     (f"a {cfg.method} layer with loss cross_entropy reconstructs probabilities", "loss: squared"))
        raise DataError(f"pretraining layer {name!r}: {what} in [0, 1], but its inputs span [{lo:.4g}, {hi:.4g}] "
                        f"(standardized data, or a layer below that is not sigmoid?). Use {fix} for real-valued "
                        "inputs, or scale them into [0, 1].")


def check_members(cfgs: list[LayerPretrainConfig], shared: tuple[str, ...], names: list[str]) -> None:
    """``ConfigError`` unless every member of a population agrees on the ``shared`` fields
    (what makes them one batched program); lr, momentum, weight decay and the like may differ."""
    for i, c in enumerate(cfgs):
        for f in shared:
            if getattr(c, f) != getattr(cfgs[0], f):
                raise ConfigError(
                    f"pretraining population, layer {names[i]!r} (member {i}): {f}={getattr(c, f)!r} but member 0 "
                    f"has {getattr(cfgs[0], f)!r}; members train together only when they share {', '.join(shared)}."
                )


def member_label(name: str, k: int, size: int) -> str:
    """A layer's name in messages: ``h1``, or ``h1 (population member 3)``."""
    return name if size == 1 else f"{name} (population member {k})"


def rows_once(xs: list[Tensor]) -> list[Tensor]:
    """Each input as contiguous rows [N, D]; an input shared by several members stays shared."""
    done: dict[int, Tensor] = {}
    return [done.setdefault(id(x), as_rows(x).contiguous()) for x in xs]


def device_generator(g: torch.Generator, device: torch.device) -> torch.Generator:
    """The generator a loop on ``device`` draws its samples and noise from: ``g`` itself on the
    CPU; elsewhere a generator on that device seeded by one draw of ``g``, so each member
    of a population keeps its own stream there too."""
    if device.type == "cpu":
        return g
    return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))


def new_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def pretrain_record(method: str, cfg: LayerPretrainConfig, batch_size: int, history: list[dict]) -> dict[str, Any]:
    """What a stack manifest records about how a layer was pretrained."""
    final = {k: v for k, v in history[-1].items() if k not in ("epoch", "seconds")} if history else {}
    return {"method": method, "epochs": cfg.epochs, "batch_size": batch_size,
            "hyperparameters": cfg.hyperparameters(), "history": history, "final": final}
