import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from surgery.cli import main
from surgery.errors import ManifestError
from surgery.stack import LayerStack
from surgery.weights_io import read_manifest
from tests.helpers import random_stack


def test_save_load_bit_identical(tmp_path):
    st = random_stack()
    st.recipe = {"name": "x"}
    p = st.save(tmp_path / "s.safetensors")
    back = LayerStack.load(p)
    assert back.names == st.names and back.recipe == {"name": "x"}
    for a, b in zip(st, back):
        assert a.spec == b.spec and a.pretrain == b.pretrain
        assert a.tensors.keys() == b.tensors.keys()
        for k in a.tensors:
            assert torch.equal(a.tensors[k], b.tensors[k])


def test_readable_with_only_safetensors_and_json(tmp_path):
    p = random_stack().save(tmp_path / "s.safetensors")
    with safe_open(str(p), framework="numpy") as f:
        manifest = json.loads(f.metadata()["surgery.manifest"])
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    assert manifest["format"] == "surgery.stack"
    assert [layer["name"] for layer in manifest["layers"]] == ["h1", "h2", "h3"]
    first = manifest["layers"][0]
    assert first["in_shape"] == [784] and first["out_shape"] == [64] and first["activation"] == "sigmoid"
    assert first["pretrain"]["method"] == "rbm"
    assert arrays["h1.weight"].shape == tuple(first["tensors"]["weight"])


def _edit_manifest(path, fn):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    man = json.loads(header["__metadata__"]["surgery.manifest"])
    man = fn(man)
    header["__metadata__"]["surgery.manifest"] = man if isinstance(man, str) else json.dumps(man)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])


def _set_out(m, v):
    m["layers"][1]["spec"]["out_features"] = v
    return m


def _list_extra_tensor(m):
    m["layers"][0]["tensors"]["extra"] = [3]
    return m


def _poison(key: str, index: int, value: float):
    """Rewrite one value of tensor ``key`` in a saved file, manifest kept."""
    def damage(path):
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        tensors[key].view(-1)[index] = value
        save_file(tensors, str(path), metadata=meta)
    return damage


CORRUPTIONS = {
    "nan weight": (_poison("h1.weight", 7, float("nan")), "tensor 'h1.weight' holds NaN or infinite"),
    "inf bias": (_poison("h2.bias", -1, float("-inf")), "tensor 'h2.bias' holds NaN or infinite"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-500]), "truncated or corrupt"),
    "garbage": (lambda p: p.write_bytes(b"\x00garbage" * 10), "not a readable safetensors"),
    "empty": (lambda p: p.write_bytes(b""), "not a readable safetensors"),
    "bad json": (lambda p: _edit_manifest(p, lambda m: "{not json"), "not valid JSON"),
    "wrong version": (lambda p: _edit_manifest(p, lambda m: {**m, "version": 99}), "manifest version 99"),
    "shape edit": (lambda p: _edit_manifest(p, lambda m: _set_out(m, 65)), "has shape .* but its spec needs"),
    "missing tensor": (lambda p: _edit_manifest(p, _list_extra_tensor), "lists tensor 'h1.extra'"),
    "dropped layer": (lambda p: _edit_manifest(p, lambda m: (m["layers"].pop(), m)[1]), "not in the manifest"),
    "model not stack": (lambda p: _edit_manifest(p, lambda m: {**m, "format": "surgery.model"}),
                        "assembled model, not a layer stack"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_damaged_files_give_one_paragraph_errors(tmp_path, case, capsys):
    p = random_stack().save(tmp_path / "s.safetensors")
    damage, pattern = CORRUPTIONS[case]
    damage(p)
    with pytest.raises(ManifestError, match=pattern):
        LayerStack.load(p)
    assert main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(p) in err and err.count("\n") == 1


def test_missing_file(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    random_stack().save(tmp_path / "stack.safetensors")
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "a directory that is not a run's" in err and "(it holds stack.safetensors)" in err, err
    assert err.count("\n") == 1, err
    with pytest.raises(ManifestError, match="a directory, not a weights file \\(it holds stack.safetensors\\)"):
        read_manifest(tmp_path)  # what the other commands say
    if Path("/dev/null").exists():
        with pytest.raises(ManifestError, match="/dev/null: not a regular file"):
            read_manifest("/dev/null")


@pytest.mark.parametrize("name, says", [
    ("quick.yaml", "a recipe, not a weights file; `surgery validate"),
    ("results.csv", "a .csv file, not a weights file"),
    ("experiment.json", "shows the run it belongs to, or `surgery validate"),
])
def test_inspect_of_a_recipe_or_a_runs_text_file_says_what_to_run_instead(tmp_path, capsys, name, says):
    (tmp_path / name).write_text("name: x\n")
    assert main(["inspect", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert says in err and "corrupt" not in err and err.count("\n") == 1, err
    assert f"surgery inspect {tmp_path}" in err or name.endswith(".yaml"), err


def test_inspect_prints_layers_and_metrics(tmp_path, capsys):
    p = random_stack().save(tmp_path / "s.safetensors")
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "h1" in out and "(784,)" in out and "recon_error=1.5" in out
    assert main(["inspect", str(p), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "surgery.stack"


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = random_stack(seed=1).save(tmp_path / "s.safetensors")
    before = p.read_bytes()
    import surgery.stack as stack_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(stack_mod, "save_file", boom)
    with pytest.raises(OSError):
        random_stack(seed=2).save(p)
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["s.safetensors"]


def test_log_lines_give_wall_time_in_a_readable_unit():
    from surgery.io import duration

    assert [duration(s) for s in (0.04, 42.15, 59.97, 61, 3590, 3599, 7530)] == [
        "0.0 s", "42.1 s", "1.0 min", "1.0 min", "59.8 min", "1 h 00 min", "2 h 06 min"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_inspect_lists_a_foreign_files_tensors_and_how_to_import_them(tmp_path, capsys, suffix):
    """A foreign weights file (no surgery manifest): `inspect` lists its tensors and shapes,
    and the surgery: section it suggests imports the first weight and bias as they are (it
    said only 'a safetensors file without a surgery manifest')."""
    import yaml

    from surgery.model_file import load_model

    sd = {"enc.weight": torch.randn(8, 16), "enc.bias": torch.randn(8), "out.weight": torch.randn(4, 8)}
    path = tmp_path / f"w{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    assert main(["inspect", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{path}: foreign weights (no surgery manifest), 3 tensors, {8 * 16 + 8 + 4 * 8:,} numbers"
    assert sorted(line.split()[0] for line in lines[1:4]) == sorted(sd) and "(8, 16)  float32" in "\n".join(lines)
    section = yaml.safe_load(lines[4].split("surgery: ", 1)[1].replace(", ...]", ", {op: head, classes: 4}]"))
    recipe = {"data": {"dataset": "synthetic", "side": 4, "n_train": 40, "classes": 4}, "surgery": section}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["assemble", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "m.safetensors")]) == 0
    g = load_model(tmp_path / "m.safetensors")
    from surgery.checkpoint import save_generator_state

    save_generator_state(tmp_path / "rng1.safetensors", torch.Generator().get_state())  # ours, but no weights
    assert main(["inspect", str(tmp_path / "rng1.safetensors")]) == 0
    assert "a random generator's state (5,056 bytes), not weights" in capsys.readouterr().out
    assert torch.equal(g.node("h1").tensors["weight"], sd["enc.weight"]) and torch.equal(g.node("h1").tensors["bias"],
                                                                                         sd["enc.bias"])


def test_repr_says_what_each_layer_is_not_its_numbers():
    """A stack printed in a notebook: a line per layer (shape, activation, how it was
    trained, its final metrics), never its tensors (print(stack) dumped every weight)."""
    st = random_stack(sizes=(784, 500, 20))
    text = repr(st)
    assert text.splitlines() == [
        "LayerStack(2 layers, input (784,), 403,804 numbers):",
        "  StackLayer('h1', dense 784 -> 500, sigmoid; rbm, 1 epoch; recon_error 1.5)",
        "  StackLayer('h2', dense 500 -> 20, sigmoid; rbm, 1 epoch; recon_error 1.5)"]
    assert repr(st["h2"]) == text.splitlines()[2].strip()
    assert repr(LayerStack()) == "LayerStack(0 layers, input (), 0 numbers)"


def test_transform_takes_numpy_and_names_a_wrong_shape_or_dtype():
    """``stack.transform`` (the public way to get a stack's features) takes a NumPy array as
    pretraining does, flattens images for a dense first layer, and refuses examples of another
    width or dtype naming the first layer, where torch said only "mat1 and mat2 shapes cannot be
    multiplied"."""
    from surgery.errors import DataError, ShapeError

    st = random_stack()
    x = torch.rand(5, 784)
    assert torch.equal(st.transform(x.numpy()), st.transform(x))
    assert torch.equal(st.transform(x.view(5, 1, 28, 28)), st.transform(x))
    with pytest.raises(ShapeError, match=r"first layer 'h1' takes input \(784,\) per example, but x of shape "
                                         r"\(5, 783\) gives \(783,\)"):
        st.transform(x[:, 1:])
    with pytest.raises(ShapeError, match=r"x of shape \(784,\) gives \(\)"):
        st.transform(x[0])
    with pytest.raises(DataError, match=r"x is torch.float64 but the stack's weights are torch.float32"):
        st.transform(x.double().numpy())


def test_save_refuses_layers_that_could_not_be_loaded_back(tmp_path):
    """A stack put together by hand whose layers do not chain, repeat a name (its tensors
    overwrote each other in the file) or hold a weight of another shape than their spec was
    written, and only load refused it; save now refuses first and keeps the file there."""
    from surgery.errors import ShapeError
    from surgery.layers import LayerSpec
    from surgery.stack import StackLayer

    def layer(name, a, b, rows=None):
        return StackLayer(name, LayerSpec(in_features=a, out_features=b),
                          {"weight": torch.randn(rows or b, a), "bias": torch.zeros(b)})

    p = random_stack().save(tmp_path / "s.safetensors")
    before = p.read_bytes()
    cases = {"layer 'h2' expects input \\(7,\\) but the previous layer gives \\(5,\\)": [layer("h1", 10, 5),
                                                                                        layer("h2", 7, 3)],
             "duplicate layer name 'h1'": [layer("h1", 10, 5), layer("h1", 5, 3)],
             "layer 'h1' tensor 'weight' has shape \\(4, 10\\) but its spec needs \\(5, 10\\)": [layer("h1", 10, 5, 4)]}
    for said, layers in cases.items():
        with pytest.raises(ShapeError, match=f"s.safetensors: not written: {said}"):
            LayerStack(layers).save(p)
        assert p.read_bytes() == before
