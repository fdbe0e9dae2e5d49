"""Device names in recipes: which a recipe may ask for (``auto``, ``cpu``, ``cuda``,
``cuda:N``), checked when the recipe loads, and which device a name means on this machine,
checked before anything trains."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import AfterValidator

from .errors import DeviceError


def device_name(name: str) -> str:
    """``name`` when it names a device a recipe may ask for, whether or not this machine has
    it (:func:`resolve_device` checks that); ``ValueError`` otherwise."""
    if name == "auto":
        return name
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return name


DeviceName = Annotated[str, AfterValidator(device_name)]


def resolve_device(name: str, field: str = "device") -> torch.device:
    """``auto`` -> cuda when available else cpu; a name that is no device, or ``cuda`` without a
    GPU, is a ``DeviceError`` naming ``field`` (the recipe field that asked for it)."""
    try:
        device_name(name)
    except ValueError as e:
        raise DeviceError(f"{field}: {e}") from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{field}: {name!r} was asked for but this machine has no usable CUDA GPU "
                "(torch.cuda.is_available() is False); use auto to fall back to the CPU."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"{field}: {name!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)."
            )
    return dev
