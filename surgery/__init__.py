"""surgery: greedy layer-wise pretraining and model surgery for PyTorch."""

__version__ = "0.1.0"

from .errors import SurgeryError  # noqa: E402

__all__ = ["SurgeryError", "__version__"]
