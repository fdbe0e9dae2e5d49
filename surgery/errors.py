"""The one exception type users see.

Every error that is the user's to fix (bad recipe, missing file, wrong shapes, NaN loss,
unknown device) is raised as a ``SurgeryError`` whose message is one paragraph naming
the field, file or layer and what to do. The CLI prints it without a traceback.
"""

from __future__ import annotations


class SurgeryError(Exception):
    """A problem the user can fix; the message says what and how."""


class ManifestError(SurgeryError):
    """A stack or model file is missing, truncated, corrupt or inconsistent."""


class ShapeError(SurgeryError):
    """Two connected layers disagree on the shape they exchange."""


class TrainingDiverged(SurgeryError):
    """A loss became NaN or infinite."""
