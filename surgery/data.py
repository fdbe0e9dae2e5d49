"""The ``data:`` recipe section and the dataset it describes: which source
(:mod:`surgery.loaders`: MNIST, IDX files, named arrays, synthetic), then the recipe's limit,
normalization and flattening, on the recipe's device. The tensors themselves are
:mod:`surgery.dataset`'s."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .configs import as_config
from .dataset import Dataset, Split
from .devices import DeviceName, resolve_device
from .errors import ConfigError, SurgeryWarning
from .loaders import load_arrays, load_idx_dir, load_mnist, synthetic

_SYNTHETIC_ONLY = {"n_train": "data.limit keeps the first N training examples",
                   "n_valid": "data.valid_size sets the validation examples",
                   "n_test": "the test split is the dataset's own", "side": "its images are the files'",
                   "classes": "its classes are its labels'"}
_NOT_SYNTHETIC = {"path": "its examples are made, not read", "valid_size": "it has data.n_valid"}


class DataConfig(BaseModel):
    """The ``data:`` recipe section."""

    model_config = ConfigDict(extra="forbid")

    dataset: Literal["mnist", "idx", "arrays", "synthetic"] = "mnist"
    path: Path | None = Field(default=None, description="mnist.pkl.gz, a directory of IDX files, or (arrays) a "
                              ".npz or .safetensors file holding x_train, y_train, x_test, y_test and "
                              "optionally x_valid, y_valid")
    limit: int | None = Field(default=None, gt=0, description="keep the first N training examples")
    flatten: bool = Field(default=True, description="[N, D] rows (true) or [N, C, H, W] images")
    valid_size: int = Field(
        default=10000, ge=0,
        description="validation examples carved from the end of the 60k training images (0: train on all, "
        "no validation, fine-tuning keeps its last epoch); arrays: from the end of x_train, unless the file "
        "holds x_valid and y_valid",
    )
    normalize: Literal["none", "standardize"] = Field(
        default="none", description="standardize: zero mean, unit variance per feature (train stats)"
    )
    device: DeviceName = Field(default="cpu", description="where the tensors live: cpu, cuda, cuda:N, auto")
    # synthetic dataset shape
    n_train: int = Field(default=2000, gt=0, description="synthetic: training examples (others: data.limit)")
    n_valid: int = Field(default=500, gt=0, description="synthetic: validation examples (others: data.valid_size)")
    n_test: int = Field(default=500, gt=0, description="synthetic: test examples")
    side: int = Field(default=8, gt=1, description="synthetic: images are side x side")
    classes: int = Field(default=4, gt=1, description="synthetic: classes")

    @field_validator("path", "valid_size", "n_train", "n_valid", "n_test", "side", "classes")
    @classmethod
    def _read_by_its_dataset(cls, value: Any, info: ValidationInfo) -> Any:
        # a field the dataset never reads would be dropped without a word (a recorded recipe
        # holds every field at its default, so only a value other than the default is one)
        dataset = info.data.get("dataset")
        synthetic = info.field_name in _SYNTHETIC_ONLY
        if dataset is None or value == cls.model_fields[str(info.field_name)].default or synthetic == (
                dataset == "synthetic"):
            return value
        readers = "synthetic" if synthetic else "mnist, idx and arrays"
        instead = (_SYNTHETIC_ONLY if synthetic else _NOT_SYNTHETIC)[str(info.field_name)]
        raise ValueError(f"read by dataset {readers} only, not {dataset} ({instead}); drop it")


def load_dataset(cfg: DataConfig | dict[str, Any] | str, base_dir: Path | None = None) -> Dataset:
    """Build the dataset a ``data:`` section describes (a DataConfig, a dict of its fields,
    or a dataset's name: ``load_dataset("mnist")``), on ``cfg.device``."""
    cfg = as_config({"dataset": cfg} if isinstance(cfg, str) else cfg, DataConfig, "surgery.load_dataset(cfg)")
    path = cfg.path.expanduser() if cfg.path is not None else None  # ~/data: a YAML file has no shell to expand it
    if path is not None and base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if cfg.dataset == "synthetic":
        ds = synthetic(cfg.n_train, cfg.n_valid, cfg.n_test, cfg.side, cfg.classes)
    elif cfg.dataset == "idx":
        if path is None:
            raise ConfigError("data.path: dataset 'idx' needs data.path, a directory of IDX files.")
        ds = load_idx_dir(path, cfg.valid_size)
    elif cfg.dataset == "arrays":
        if path is None:
            raise ConfigError("data.path: dataset 'arrays' needs data.path, a .npz or .safetensors file holding "
                              "x_train, y_train, x_test, y_test (and optionally x_valid, y_valid).")
        ds = load_arrays(path, cfg.valid_size if "valid_size" in cfg.model_fields_set else None)
    else:
        ds = load_mnist(path, cfg.valid_size)
    if cfg.limit is not None:
        if cfg.limit > len(ds.train):
            warnings.warn(f"data.limit: {cfg.limit} is more than the {len(ds.train)} training examples of "
                          f"{ds.name} (valid_size: {cfg.valid_size}); all {len(ds.train)} are used.",
                          SurgeryWarning, stacklevel=2)
        ds.train = Split(ds.train.x[: cfg.limit], ds.train.y[: cfg.limit])
    if cfg.normalize == "standardize":
        mean = ds.train.x.mean(0, keepdim=True)
        std = ds.train.x.std(0, keepdim=True).clamp_min(1e-3)
        for s in (ds.train, ds.valid, ds.test):
            s.x = (s.x - mean) / std
    if cfg.flatten:
        for s in (ds.train, ds.valid, ds.test):
            s.x = s.x.flatten(1).contiguous()
    warn_unseen_classes(ds)
    return ds.to(resolve_device(cfg.device, "data.device"))


def warn_unseen_classes(ds: Dataset) -> None:
    """A ``SurgeryWarning`` when the training labels skip class numbers below their largest
    (labels 1-10 skip 0): the network's head gets an output for each, never trained. Said
    where the data is loaded, once a run; what fine-tuning refuses is
    :func:`surgery.preflight.check_data`'s."""
    y = ds.train.y
    if y.dtype != torch.int64 or not len(y) or int(y.min()) < 0:
        return  # refused by check_data, in its own words
    seen = torch.unique(y).tolist()
    runs, last = [], -1
    for v in seen:
        if v > last + 1:
            runs.append(str(last + 1) if v == last + 2 else f"{last + 1}-{v - 1}")
        last = v
    if not runs or len(seen) < 2:  # one class is refused by check_data
        return
    one = runs[0] if len(runs) == 1 and "-" not in runs[0] else None
    todo = (f"If the labels count from 1, subtract 1 from them (0-{last - 1}): the head then has one output less."
            if one == "0" else "Classes left out on purpose need nothing; otherwise check the labels (a small "
            "data.limit can leave classes out).")
    warnings.warn(f"the data {ds.name!r}: its training labels go up to {last} but hold no example of "
                  f"class{'' if one else 'es'} {', '.join(runs)}; the network's head gets an output for each of "
                  f"0-{last}, and {'that one is' if one else 'those are'} never trained. {todo}",
                  SurgeryWarning, stacklevel=3)
