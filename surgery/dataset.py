"""A dataset as tensors: three splits of ``(x: float32 [N, D] or [N, C, H, W], y: int64 [N])``
that live on the target device, a fingerprint of what was trained on, and the batches of an
epoch: contiguous slices of a once-per-epoch permuted copy, so the hot loop makes no
per-batch Python objects beyond the slice views. No configs here: the training engines
import this, the ``data:`` section (:mod:`surgery.data`) sits above it."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .configs import as_tensor
from .errors import DataError


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
