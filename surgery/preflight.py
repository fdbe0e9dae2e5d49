"""What fine-tuning refuses (or warns about) before it trains, for a single network and a
population alike, and for a run planning its network before pretraining
(:func:`surgery.planning.plan_network`): data it cannot use, a network that does not fit the
data, a layer pattern that names no layer, a batch larger than the training set."""

from __future__ import annotations

import fnmatch
import warnings

import torch

from .dataset import Dataset, non_finite
from .errors import ConfigError, DataError, ShapeError, SurgeryWarning
from .finetune_config import LAYER_PATTERN_FIELDS, FinetuneConfig
from .graph import ModelGraph
from .layers import input_fits


def check_data(data: Dataset) -> None:
    """``DataError`` unless each split of ``data`` holds float32 examples and as many integer
    labels, none negative, every input finite, the training split at least one example of
    two classes or more, and the validation and test labels among the training's class numbers."""
    for name in ("train", "valid", "test"):
        split = getattr(data, name)
        if split.x.dtype != torch.float32 or split.y.dtype != torch.int64:
            raise DataError(f"the data {data.name!r}: its {name} split has {split.x.dtype} examples and "
                            f"{split.y.dtype} labels; give float32 examples (x.float()) and int64 class "
                            "labels (y.long()).")
        if split.y.dim() != 1 or split.y.shape[0] != split.x.shape[0]:
            raise DataError(f"the data {data.name!r}: its {name} split has {split.x.shape[0]} examples but labels "
                            f"of shape {tuple(split.y.shape)}; give one label per example, y of shape [N].")
        if name == "train" and not len(split):
            raise DataError(f"the data {data.name!r}: its train split is empty; nothing to train on.")
        if name == "test" and not len(split):  # an empty valid split is one way of training without validation
            raise DataError(f"the data {data.name!r}: its test split is empty; a test error over no examples "
                            "would read 0%. Give it test examples (x_test, y_test).")
        bad = non_finite(split.x)
        if bad:
            raise DataError(f"the data {data.name!r}: its {name} split holds {bad} NaN or infinite inputs; every "
                            "example must be finite (clean the data) before training.")
        if len(split) and int(split.y.min()) < 0:
            raise DataError(f"the data {data.name!r}: its {name} split has negative labels (from "
                            f"{int(split.y.min())}); classes are numbered 0, 1, 2, ...")
    _check_classes(data)


def _check_classes(data: Dataset) -> None:
    """The training labels name two classes or more, and every validation and test label is
    one of the class numbers the network's head will have (0 to the largest training label)."""
    seen = torch.unique(data.train.y)
    if len(seen) < 2:
        raise DataError(f"the data {data.name!r}: its train split holds one class only ({int(seen[0])}); a "
                        "classifier needs examples of two classes or more.")
    for name in ("valid", "test"):
        y = getattr(data, name).y
        if len(y) and int(y.max()) >= data.num_classes:
            raise DataError(f"the data {data.name!r}: its {name} split has labels up to {int(y.max())}, but the "
                            f"training labels go up to {data.num_classes - 1} (the network gets a class for each "
                            "of 0 to that); a class training never shows cannot be learned. Check that every split "
                            "numbers the classes alike (0-9, not 1-10 in one of them), and that data.limit leaves "
                            "training examples of every class.")


def warn_large_batch(cfg: FinetuneConfig, data: Dataset) -> None:
    """A ``SurgeryWarning`` when ``cfg.batch_size`` exceeds the training examples: each epoch is
    then one step on all of them, rarely what a batch size that large was meant for."""
    if cfg.batch_size > len(data.train):
        warnings.warn(f"finetune.batch_size: {cfg.batch_size} is more than the {len(data.train)} training examples "
                      f"of {data.name!r}; each epoch is one step on all {len(data.train)}.", SurgeryWarning,
                      stacklevel=3)


def warn_cuda_only(cfg: FinetuneConfig, device: torch.device) -> None:
    """A ``SurgeryWarning`` when ``amp`` is asked for on a device it does not apply to."""
    if cfg.amp and device.type != "cuda":
        warnings.warn(f"finetune.amp: bf16 autocast applies on CUDA only; on {device.type} fine-tuning runs in "
                      "float32, as with amp: false.", SurgeryWarning, stacklevel=3)


def check_fits(graph: ModelGraph, data: Dataset) -> None:
    """Raise ``ShapeError`` unless ``data`` feeds ``graph`` and its labels fit its output."""
    shapes = graph.validate()
    if graph.input_shape is not None and not input_fits(graph.input_shape, data.input_shape):
        raise ShapeError(
            f"the network takes input {graph.input_shape} but the data {data.name!r} gives "
            f"{data.input_shape} per example; check data.flatten or the first layer's size."
        )
    last = graph.last()
    out = shapes[last] if last is not None else ()
    if len(out) != 1 or out[0] < data.num_classes:
        raise ShapeError(
            f"the network ends in {last!r} with output {out}, but the data {data.name!r} has "
            f"{data.num_classes} classes; end it with a head of {data.num_classes} units (op: head)."
        )


def check_patterns(names: list[str], cfg: FinetuneConfig) -> None:
    """``ConfigError`` when a ``layer_lr``/``unfreeze_at``/``freeze_at``/``dropout`` pattern
    matches none of the layers ``names``."""
    for field in LAYER_PATTERN_FIELDS:
        for pat in getattr(cfg, field):
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise ConfigError(f"finetune.{field}: {pat!r} matches no layer; layers are {names}.")
