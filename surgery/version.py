"""The package version, in a module of its own so that every layer can read it."""

from __future__ import annotations

__version__ = "0.1.0"


def package_version() -> str:
    """The installed ``surgery`` version (recorded in every file the package writes)."""
    return __version__
