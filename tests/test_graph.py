import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from surgery.errors import ShapeError, SurgeryError
from surgery.graph import ModelGraph, Node, layer_node
from surgery.layers import LayerSpec
from surgery.ops import SurgeryConfig, build_graph
from surgery.stack import LayerStack, StackLayer
from tests.helpers import random_stack


def _forward_upto(module, x, stop):
    for name, m in module.named_children():
        x = m(x)
        if name == stop:
            return x
    raise KeyError(stop)


def test_transplanted_layer_computes_exactly_what_it_did_in_its_source():
    a, b = random_stack(seed=1), random_stack(seed=2)
    g = ModelGraph()
    g.take(a, 0, 2, "a")
    g.take(b, 2, 3, "b")
    g.head(10)
    net = g.compile()
    x = torch.rand(32, 784)
    h2 = a.transform(x, upto=2)
    assert torch.equal(_forward_upto(net, x, "h2"), h2)
    assert torch.equal(_forward_upto(net, x, "h3"), b[2].transform(h2))
    assert g.node("h3").provenance["source"] == "b"


def test_repeated_take_gives_independent_tensors():
    a = random_stack(sizes=(16, 16, 16))
    g = ModelGraph()
    g.take(a, 0, 2, "a", prefix="x_")
    g.take(a, 0, 2, "a", prefix="y_")
    wx, wy = g.node("x_h1").tensors["weight"], g.node("y_h1").tensors["weight"]
    assert torch.equal(wx, wy) and wx.data_ptr() != wy.data_ptr()
    wx.add_(1.0)
    assert not torch.equal(wx, wy) and torch.equal(wy, a[0].tensors["weight"])
    with pytest.raises(SurgeryError, match="duplicate node name 'h1'"):
        g2 = ModelGraph()
        g2.take(a, 0, 1, "a")
        g2.take(a, 0, 1, "a")


@pytest.mark.parametrize("act", ["relu", "linear"])
def test_deepen_is_exact_for_relu_and_linear(act):
    g = ModelGraph()
    g.take(random_stack(sizes=(20, 12, 8), act=act), 0, 2, "s")
    g.head(3)
    with torch.no_grad():
        g.node("out").tensors["weight"].normal_()
    x = torch.randn(50, 20)
    before = g.compile()(x)
    g.deepen("h1")
    g.deepen("h2", name="extra")
    assert g.order() == ["h1", "h1_deep", "h2", "extra", "out"]
    assert torch.equal(g.compile()(x), before)


def test_deepen_after_sigmoid_explains_and_offers_linear():
    g = ModelGraph()
    g.take(random_stack(sizes=(20, 12, 8)), 0, 2, "s")
    x = torch.rand(10, 20)
    before = g.compile()(x)
    with pytest.raises(SurgeryError, match="sigmoid.*activation: linear"):
        g.deepen("h1")
    g.deepen("h1", activation="linear")
    assert torch.allclose(g.compile()(x), before, atol=1e-7)
    g.deepen("h2", allow_inexact=True)
    assert not torch.allclose(g.compile()(x), before, atol=1e-3)


@pytest.mark.parametrize("act", ["sigmoid", "relu", "tanh"])
def test_widen_preserves_the_function(act):
    g = ModelGraph()
    g.take(random_stack(sizes=(20, 12, 8), act=act), 0, 2, "s")
    g.add_dropout("h1", 0.5)
    g.head(4)
    with torch.no_grad():
        g.node("out").tensors["weight"].normal_()
    x = torch.randn(40, 20)
    net = g.compile().eval()
    before = net(x)
    changed = g.widen("h1", 30, generator=torch.Generator().manual_seed(0))
    assert changed == ["h1", "h2"]
    g.widen("h2", 17, generator=torch.Generator().manual_seed(1))
    after = g.compile().eval()(x)
    assert g.shapes()["h1"] == (30,) and g.node("out").spec.in_features == 17
    assert torch.allclose(after, before, atol=1e-5)


def test_compile_frozen_and_names_map_to_nodes():
    g = ModelGraph()
    g.take(random_stack(), 0, 3, "s")
    g.head(10, hidden=[5])
    g.set_frozen(["h*"], True)
    net = g.compile()
    assert isinstance(net, nn.Sequential)
    names = dict(net.named_parameters())
    assert set(names) == {f"{n}.{p}" for n in ["h1", "h2", "h3", "fc1", "out"] for p in ("weight", "bias")}
    assert not names["h2.weight"].requires_grad and names["fc1.weight"].requires_grad


def test_model_file_round_trips(tmp_path):
    g = ModelGraph()
    g.take(random_stack(), 0, 3, "s")
    g.add_dropout(["h1"], 0.2)
    g.head(10)
    g.set_frozen("h1", True)
    p = g.save(tmp_path / "m.safetensors")
    back = ModelGraph.load(p)
    assert back.order() == g.order() and back.node("h1").frozen and back.node("drop_h1").p == 0.2
    sa, sb = g.compile().state_dict(), back.compile().state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(SurgeryError, match="assembled model, not a layer stack"):
        LayerStack.load(p)


def test_dag_with_merges_compiles():
    g = ModelGraph((10,))
    s = lambda i, o, a="relu": LayerSpec(in_features=i, out_features=o, activation=a)  # noqa: E731
    g.add_node(layer_node("a", s(10, 6)))
    g.add_node(layer_node("b", s(6, 6)), ["a"])
    g.add_node(layer_node("c", s(6, 6)), ["a"])
    g.add_node(Node("sum", "add"), ["b", "c"])
    g.add_node(layer_node("d", s(6, 3)), ["a"])
    g.add_node(Node("cat", "concat"), ["sum", "d"])
    g.add_node(layer_node("out", s(9, 2, "linear")), ["cat"])
    assert g.shapes()["cat"] == (9,)
    net = g.compile()
    x = torch.randn(5, 10)
    m = dict(net.named_children())
    a = m["a"](x)
    expect = m["out"](torch.cat([m["b"](a) + m["c"](a), m["d"](a)], 1))
    assert torch.equal(net(x), expect)


def test_shape_mismatch_names_both_nodes_and_shapes():
    g = ModelGraph()
    g.take(random_stack(sizes=(784, 64, 32)), 0, 1, "a")
    with pytest.raises(ShapeError, match=r"'h1' gives \(64,\) but 'z2' expects \(16,\)"):
        g.append(layer_node("z2", LayerSpec(in_features=16, out_features=4)))
        g.validate()


def test_cycle_is_reported():
    g = ModelGraph((4,))
    spec = LayerSpec(in_features=4, out_features=4)
    g.add_node(layer_node("a", spec))
    g.add_node(layer_node("b", spec), ["a"])
    g.g.add_edge("b", "a")
    with pytest.raises(ShapeError, match="cycle"):
        g.validate()


def test_import_foreign_safetensors_and_state_dict(tmp_path):
    ref = nn.Sequential(nn.Linear(20, 8), nn.Sigmoid(), nn.Linear(8, 3))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()} | {"junk": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    # An RBM-style file storing W as visible x hidden
    torch.save({"W": ref[0].weight.detach().t().clone(), "hbias": ref[0].bias.detach().clone()}, tmp_path / "rbm.pt")
    cfg = SurgeryConfig.model_validate({
        "sources": {
            "w": {"path": "w.safetensors", "map": {"0.weight": "h1.weight", "0.bias": "h1.bias",
                                                   "2.weight": "o.weight", "2.bias": "o.bias"}},
            "r": {"path": "rbm.pt", "map": {"W": {"to": "r1.weight", "transpose": True}, "hbias": "r1.bias"}},
        },
        "ops": [{"op": "import", "source": "w", "layers": ["h1"]},
                {"op": "import", "source": "w", "layers": ["o"], "activation": "linear"}],
    })
    from surgery.pipeline import load_sources
    from surgery.recipe import Recipe

    r = Recipe(surgery=cfg)
    r._base_dir = tmp_path
    sources = load_sources(r, None)
    g = build_graph(cfg, sources)
    x = torch.randn(7, 20)
    assert torch.equal(g.compile()(x), ref(x))
    assert "skipped ['junk']" in g.report[0]
    g2 = build_graph(SurgeryConfig.model_validate({"sources": cfg.sources, "ops": [
        {"op": "import", "source": "r", "layers": ["r1"]}]}), sources)
    assert torch.allclose(g2.compile()(x), torch.sigmoid(ref[0](x)))


def test_graph_ops_through_the_recipe_section():
    st = random_stack()
    cfg = SurgeryConfig.model_validate({"sources": {"a": "a.safetensors"}, "ops": [
        {"op": "take", "source": "a", "layers": [0, 2]},
        {"op": "insert", "name": "mid", "units": 20, "after": "h1", "init": "sparse"},
        {"op": "remove", "node": "mid"},
        {"op": "transplant", "source": "a", "layers": 2, "after": "h2"},
        {"op": "head", "classes": 10},
        {"op": "reinit", "nodes": ["h3"], "init": "xavier"},
        {"op": "freeze", "nodes": ["h*"]},
        {"op": "unfreeze", "nodes": ["h3"]},
        {"op": "dropout", "p": 0.3, "after": "h1"},
        {"op": "widen", "node": "h2", "units": 40},
        {"op": "deepen", "after": "h2", "activation": "linear"},
    ]})
    g = build_graph(cfg, {"a": st})
    assert g.order() == ["h1", "drop_h1", "h2", "h2_deep", "h3", "out"]
    assert g.node("h1").frozen and not g.node("h3").frozen
    assert g.node("h3").provenance["reinit"] == "xavier"
    with pytest.raises(SurgeryError, match=r"ops\[0\] \(take\): layers \[0, 9\) is out of range for source 'a'"):
        build_graph(SurgeryConfig.model_validate({"sources": {"a": "x"}, "ops": [{"op": "take", "source": "a", "layers": [0, 9]}]}), {"a": st})


def test_conv_then_dense_flattens():
    spec = LayerSpec(kind="conv2d", in_features=1, out_features=4, in_shape=(1, 8, 8), kernel_size=3)
    st = LayerStack([StackLayer("c1", spec, {"weight": torch.randn(4, 1, 3, 3), "bias": torch.zeros(4)})])
    g = ModelGraph()
    g.take(st, 0, 1, "c")
    g.head(2)
    assert g.node("out").spec.in_features == 4 * 6 * 6
    assert g.compile()(torch.rand(3, 1, 8, 8)).shape == (3, 2)
