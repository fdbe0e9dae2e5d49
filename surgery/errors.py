"""The one family of exceptions users see.

Every error that is the user's to fix (bad recipe, missing file, wrong shapes, NaN loss,
unknown device) is raised as a ``SurgeryError`` subclass whose message is one paragraph
naming the field, file or layer and what to do. The CLI prints it without a traceback and
exits with status 2. Like scikit-learn's ``NotFittedError(ValueError, AttributeError)``,
members also derive from the builtin a caller would expect, so ``except ValueError`` keeps
working for configuration and shape errors.
"""

from __future__ import annotations


class SurgeryError(Exception):
    """A problem the user can fix; the message says what and how."""


class ConfigError(SurgeryError, ValueError):
    """A recipe field or parameter has a value outside what it accepts."""


class DataError(SurgeryError):
    """A dataset file is missing, unreadable or in the wrong format."""


class DeviceError(SurgeryError, ValueError):
    """A device name is unknown, or the device is not available on this machine."""


class ShapeError(SurgeryError, ValueError):
    """Two connected layers, or a network and its data, disagree on a shape."""


class ManifestError(SurgeryError):
    """A stack or model file is missing, truncated, corrupt or inconsistent."""


class CheckpointError(ManifestError):
    """A checkpoint is missing, unreadable, or made for another network."""


class OutputError(SurgeryError, OSError):
    """An output file or directory cannot be written."""


class NameNotFound(SurgeryError, KeyError):
    """A layer or node name that does not exist was asked for."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class OutOfMemory(SurgeryError, MemoryError):
    """A layer, a batch or the data needs more memory than the machine (or its GPU) has."""


class TrainingDiverged(SurgeryError, ArithmeticError):
    """A loss became NaN or infinite."""


class SurgeryWarning(UserWarning):
    """Training finished but something in it deserves a look (e.g. a pretrained layer whose
    units mostly went inactive); the CLI prints it as one line."""
