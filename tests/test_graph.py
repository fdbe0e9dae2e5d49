import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from surgery.assembly import SurgeryConfig, build_graph
from surgery.errors import ShapeError, SurgeryError
from surgery.graph import ModelGraph, Node, layer_node
from surgery.layers import LayerSpec
from surgery.model_file import load_model, save_model
from surgery.modules import to_module
from surgery.ops import DeepenOp, DropoutOp, FreezeOp, HeadOp, TakeOp, TransplantOp, WidenOp
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
    TakeOp(source="a", layers=(0, 2)).apply(g, {"a": a})
    TakeOp(source="b", layers=(2, 3)).apply(g, {"b": b})
    HeadOp(classes=10).apply(g)
    net = to_module(g)
    x = torch.rand(32, 784)
    h2 = a.transform(x, upto=2)
    assert torch.equal(_forward_upto(net, x, "h2"), h2)
    assert torch.equal(_forward_upto(net, x, "h3"), b[2].transform(h2))
    assert g.node("h3").provenance["source"] == "b"


def test_layers_cut_from_a_model_compute_what_they_did_there(tmp_path):
    """A fine-tuned or assembled model is a source as a stack is: ``take``/``transplant``
    copy its layer nodes in order (dropout left out, frozen flags left behind), and the copies
    compute exactly what they computed in the model, also after a save and load."""
    src = ModelGraph()
    TakeOp(source="a").apply(src, {"a": random_stack(seed=1)})
    HeadOp(classes=10).apply(src)
    DropoutOp(p=0.5, after="h1").apply(src)
    FreezeOp(nodes=["h1"]).apply(src)
    with torch.no_grad():  # as if fine-tuned: the head is no longer zeros
        src.node("out").tensors["weight"].normal_()
    model = load_model(save_model(src, tmp_path / "model.safetensors"))
    g = build_graph([TakeOp(source="m", layers=(0, 3)), TransplantOp(source="m", layers=(3, 4), after="h3")],
                    {"m": model})
    assert g.order() == ["h1", "h2", "h3", "out"] and not g.node("h1").frozen
    assert g.node("out").provenance == {"source": "m", "layer": "out", "index": 3}
    assert g.node("h2").provenance["method"] == "rbm"
    x = torch.rand(16, 784)
    whole, cut = to_module(src).eval(), to_module(g)
    assert torch.equal(_forward_upto(cut, x, "h2"), _forward_upto(whole, x, "h2"))
    assert torch.equal(cut(x), whole(x))
    g.node("h1").tensors["weight"].zero_()  # copies: the source model is untouched
    assert model.node("h1").tensors["weight"].abs().sum() > 0
    with pytest.raises(SurgeryError, match=r"layers \[0, 5\) is out of range for source 'm', which has 4 layers "
                                           r"\['h1', 'h2', 'h3', 'out'\]"):
        build_graph([TakeOp(source="m", layers=(0, 5))], {"m": model})
    model.add_node(Node("sum", kind="add"), ["h1", "h2"])
    with pytest.raises(SurgeryError, match=r"source 'm' is a model whose graph branches \(at \['sum'\]\)"):
        build_graph([TakeOp(source="m")], {"m": model})


@pytest.mark.parametrize("where,order", [
    ("h2", ["h1", "b_h2", "h3", "out"]),  # in the middle: between h1 and h3
    ("h1", ["b_h1", "h2", "h3", "out"]),  # the first layer: the new chain takes the input
    ("h3", ["h1", "h2", "b_h3", "out"]),  # the last hidden layer: the head follows it
])
def test_transplant_replacing_puts_the_layers_where_the_node_was(where, order):
    """``transplant ... replacing: NODE`` swaps NODE for the source's layers: every layer
    computes what it computed in its own stack, on what the layer before it gives."""
    a, b = random_stack(seed=1), random_stack(seed=2)
    layers = {"h1": (0, 1), "h2": (1, 2), "h3": (2, 3)}[where]
    g = ModelGraph()
    TakeOp(source="a").apply(g, {"a": a})
    HeadOp(classes=10).apply(g)
    TransplantOp(source="b", layers=layers, prefix="b_", replacing=where).apply(g, {"b": b})
    assert g.order() == order and where not in g
    net, x = to_module(g), torch.rand(16, 784)
    h = x
    for name in order[:-1]:
        h = (b if name.startswith("b_") else a)[int(name[-1]) - 1].transform(h)
        assert torch.equal(_forward_upto(net, x, name), h), name
    assert g.validate()["out"] == (10,)


def test_transplant_replacing_the_only_layer_takes_its_input():
    a, b = random_stack(seed=1), random_stack(seed=2)
    g = ModelGraph()
    TakeOp(source="a", layers=(0, 1)).apply(g, {"a": a})
    TransplantOp(source="b", layers=(0, 2), prefix="b_", replacing="h1").apply(g, {"b": b})
    HeadOp(classes=10).apply(g)
    assert g.order() == ["b_h1", "b_h2", "out"] and g.input_shape == (784,)
    x = torch.rand(16, 784)
    assert torch.equal(_forward_upto(to_module(g), x, "b_h2"), b.transform(x, upto=2))


def test_repr_lists_the_nodes_in_order_without_their_numbers():
    """A graph printed in a notebook: input, parameters (trainable when some are frozen), then
    a node a line with what it is and where it came from; inputs shown where it branches;
    a graph that does not validate (mid-surgery, a cycle) still prints."""
    g = ModelGraph()
    TakeOp(source="a", layers=(0, 2)).apply(g, {"a": random_stack(sizes=(784, 500, 20))})
    HeadOp(classes=10).apply(g)
    DropoutOp(p=0.5, after="h1").apply(g)
    FreezeOp(nodes=["h1"]).apply(g)
    assert repr(g).splitlines() == [
        "ModelGraph(input (784,), 4 nodes, 402,730 parameters, 10,230 trainable):",
        "  Node('h1', dense 784 -> 500, sigmoid, frozen; source=a, layer=h1, index=0, method=rbm)",
        "  Node('drop_h1', dropout 0.5; source=dropout)",
        "  Node('h2', dense 500 -> 20, sigmoid; source=a, layer=h2, index=1, method=rbm)",
        "  Node('out', dense 20 -> 10, linear; source=fresh, init=zeros)"]
    g.add_node(Node("sum", kind="add"), ["h1", "h2"])
    assert repr(g).splitlines()[-1] == "  Node('sum', add) <- h1, h2"
    assert repr(g).splitlines()[1].endswith("method=rbm) <- input")
    g.g.add_edge("out", "h1")  # a cycle: order() raises, repr does not
    assert repr(g).startswith("ModelGraph(input (784,), 5 nodes")
    assert repr(ModelGraph()) == "ModelGraph(input None, 0 nodes, 0 parameters)"


def test_repeated_take_gives_independent_tensors():
    a = random_stack(sizes=(16, 16, 16))
    g = ModelGraph()
    TakeOp(source="a", layers=(0, 2), prefix="x_").apply(g, {"a": a})
    TakeOp(source="a", layers=(0, 2), prefix="y_").apply(g, {"a": a})
    wx, wy = g.node("x_h1").tensors["weight"], g.node("y_h1").tensors["weight"]
    assert torch.equal(wx, wy) and wx.data_ptr() != wy.data_ptr()
    wx.add_(1.0)
    assert not torch.equal(wx, wy) and torch.equal(wy, a[0].tensors["weight"])
    with pytest.raises(SurgeryError, match="duplicate node name 'h1'"):
        g2 = ModelGraph()
        TakeOp(source="a", layers=(0, 1)).apply(g2, {"a": a})
        TakeOp(source="a", layers=(0, 1)).apply(g2, {"a": a})


@pytest.mark.parametrize("act", ["relu", "linear"])
def test_deepen_is_exact_for_relu_and_linear(act):
    g = ModelGraph()
    TakeOp(source="s", layers=(0, 2)).apply(g, {"s": random_stack(sizes=(20, 12, 8), act=act)})
    HeadOp(classes=3).apply(g)
    with torch.no_grad():
        g.node("out").tensors["weight"].normal_()
    x = torch.randn(50, 20)
    before = to_module(g)(x)
    DeepenOp(after="h1").apply(g)
    DeepenOp(after="h2", name="extra").apply(g)
    assert g.order() == ["h1", "h1_deep", "h2", "extra", "out"]
    assert torch.equal(to_module(g)(x), before)


def test_deepen_after_sigmoid_explains_and_offers_linear():
    g = ModelGraph()
    TakeOp(source="s", layers=(0, 2)).apply(g, {"s": random_stack(sizes=(20, 12, 8))})
    x = torch.rand(10, 20)
    before = to_module(g)(x)
    with pytest.raises(SurgeryError, match="sigmoid.*activation: linear"):
        DeepenOp(after="h1").apply(g)
    DeepenOp(after="h1", activation="linear").apply(g)
    assert torch.allclose(to_module(g)(x), before, atol=1e-7)
    DeepenOp(after="h2", allow_inexact=True).apply(g)
    assert not torch.allclose(to_module(g)(x), before, atol=1e-3)


@pytest.mark.parametrize("act", ["sigmoid", "relu", "tanh"])
def test_widen_preserves_the_function(act):
    g = ModelGraph()
    TakeOp(source="s", layers=(0, 2)).apply(g, {"s": random_stack(sizes=(20, 12, 8), act=act)})
    DropoutOp(p=0.5, after="h1").apply(g)
    HeadOp(classes=4).apply(g)
    with torch.no_grad():
        g.node("out").tensors["weight"].normal_()
    x = torch.randn(40, 20)
    net = to_module(g).eval()
    before = net(x)
    changed = WidenOp(node="h1", units=30).apply(g, None, torch.Generator().manual_seed(0))
    assert changed == ["h1", "h2"]
    WidenOp(node="h2", units=17).apply(g, None, torch.Generator().manual_seed(1))
    after = to_module(g).eval()(x)
    assert g.shapes()["h1"] == (30,) and g.node("out").spec.in_features == 17
    assert torch.allclose(after, before, atol=1e-5)


def test_widen_with_noise_breaks_the_symmetry_of_copied_units():
    """``noise`` perturbs the consumer's weights (a copied unit and its original no longer
    share their outgoing weights), the function close to what it was, the draw the seed's."""
    def widened(noise, seed=0):
        g = ModelGraph()
        TakeOp(source="s", layers=(0, 2)).apply(g, {"s": random_stack(sizes=(20, 12, 8))})
        before = to_module(g)(x)
        WidenOp(node="h1", units=24, noise=noise).apply(g, None, torch.Generator().manual_seed(seed))
        return g, before, to_module(g)(x)

    x = torch.randn(40, 20)
    g, before, after = widened(0.01)
    w1, w2 = g.node("h1").tensors["weight"], g.node("h2").tensors["weight"]
    copies = [(j, i) for j in range(12, 24) for i in range(12) if torch.equal(w1[j], w1[i])]
    assert len(copies) == 12  # each new unit copies one old unit's incoming weights
    assert all(not torch.allclose(w2[:, j], w2[:, i]) for j, i in copies)
    assert not torch.equal(after, before) and torch.allclose(after, before, atol=0.05)
    assert torch.equal(widened(0.01)[2], after) and not torch.equal(widened(0.01, seed=1)[2], after)
    exact = widened(0.0)[0].node("h2").tensors["weight"]
    assert all(torch.equal(exact[:, j], exact[:, i]) for j, i in copies)


def test_compile_frozen_and_names_map_to_nodes():
    g = ModelGraph()
    TakeOp(source="s", layers=(0, 3)).apply(g, {"s": random_stack()})
    HeadOp(classes=10, hidden=[5]).apply(g)
    FreezeOp(nodes=["h*"]).apply(g)
    net = to_module(g)
    assert isinstance(net, nn.Sequential)
    names = dict(net.named_parameters())
    assert set(names) == {f"{n}.{p}" for n in ["h1", "h2", "h3", "fc1", "out"] for p in ("weight", "bias")}
    assert not names["h2.weight"].requires_grad and names["fc1.weight"].requires_grad


def test_model_file_round_trips(tmp_path):
    g = ModelGraph()
    TakeOp(source="s", layers=(0, 3)).apply(g, {"s": random_stack()})
    DropoutOp(p=0.2, after=["h1"]).apply(g)
    HeadOp(classes=10).apply(g)
    FreezeOp(nodes=["h1"]).apply(g)
    p = save_model(g, tmp_path / "m.safetensors")
    back = load_model(p)
    assert back.order() == g.order() and back.node("h1").frozen and back.node("drop_h1").p == 0.2
    sa, sb = to_module(g).state_dict(), to_module(back).state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(SurgeryError, match="assembled model, not a layer stack. To take a model's layers into "
                                           "another network, name the file under a recipe's surgery.sources"):
        LayerStack.load(p)
    with pytest.raises(SurgeryError, match="a layer stack, not an assembled model. A network with a head is made of "
                                           "a stack's layers by a recipe's surgery: section"):
        load_model(random_stack().save(tmp_path / "s.safetensors"))


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
    net = to_module(g)
    x = torch.randn(5, 10)
    m = dict(net.named_children())
    a = m["a"](x)
    expect = m["out"](torch.cat([m["b"](a) + m["c"](a), m["d"](a)], 1))
    assert torch.equal(net(x), expect)


def test_shape_mismatch_names_both_nodes_and_shapes():
    g = ModelGraph()
    TakeOp(source="a", layers=(0, 1)).apply(g, {"a": random_stack(sizes=(784, 64, 32))})
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
    tensors = {k: v.contiguous() for k, v in ref.state_dict().items()} | {"junk": torch.zeros(2)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
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
    from surgery.planning import load_sources
    from surgery.recipe import Recipe

    r = Recipe(surgery=cfg)
    r._base_dir = tmp_path
    sources = load_sources(r, None)
    g = build_graph(cfg, sources)
    x = torch.randn(7, 20)
    assert torch.equal(to_module(g)(x), ref(x))
    assert "skipped ['junk']" in g.report[0]
    g2 = build_graph(SurgeryConfig.model_validate({"sources": cfg.sources, "ops": [
        {"op": "import", "source": "r", "layers": ["r1"]}]}), sources)
    assert torch.allclose(to_module(g2)(x), torch.sigmoid(ref[0](x)))


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
        take = {"op": "take", "source": "a", "layers": [0, 9]}
        build_graph(SurgeryConfig.model_validate({"sources": {"a": "x"}, "ops": [take]}), {"a": st})


def test_conv_then_dense_flattens():
    spec = LayerSpec(kind="conv2d", in_features=1, out_features=4, in_shape=(1, 8, 8), kernel_size=3)
    st = LayerStack([StackLayer("c1", spec, {"weight": torch.randn(4, 1, 3, 3), "bias": torch.zeros(4)})])
    g = ModelGraph()
    TakeOp(source="c", layers=(0, 1)).apply(g, {"c": st})
    HeadOp(classes=2).apply(g)
    assert g.node("out").spec.in_features == 4 * 6 * 6
    assert to_module(g)(torch.rand(3, 1, 8, 8)).shape == (3, 2)
