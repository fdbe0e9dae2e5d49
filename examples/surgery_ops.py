"""Model surgery with the Python API: take two layers of one stack, transplant a layer
of another, widen and deepen function-preservingly, and check that the transplanted
layer computes exactly what it computed in its source; then cut the first two layers out
of the finished model (as one would out of a fine-tuned model.safetensors) into a new net.

    python examples/surgery_ops.py
"""

import torch

import surgery as S
from surgery.layers import LayerSpec
from surgery.stack import LayerStack, StackLayer


def random_stack(seed: int, sizes=(784, 256, 128, 64), act="relu") -> LayerStack:
    g = torch.Generator().manual_seed(seed)
    layers = [StackLayer(f"h{i + 1}", LayerSpec(in_features=a, out_features=b, activation=act),
                         {"weight": torch.randn(b, a, generator=g) * 0.05, "bias": torch.zeros(b)})
              for i, (a, b) in enumerate(zip(sizes, sizes[1:]))]
    return LayerStack(layers)


a, b = random_stack(1), random_stack(2)
sources = {"a": a, "b": b}
graph = S.build_graph([
    S.TakeOp(source="a", layers=(0, 2)),  # layers [0, 2) of stack a: h1, h2
    S.TakeOp(source="b", layers=(2, 3)),  # layer 2 of stack b: h3
    S.HeadOp(classes=10),
], sources)
with torch.no_grad():
    graph.node("out").tensors["weight"].normal_()

x = torch.rand(16, 784)
net = S.to_module(graph).eval()
inside = net.h3(net.h2(net.h1(x)))
assert torch.equal(inside, b[2].transform(a.transform(x, upto=2)))

before = net(x).detach()
S.WidenOp(node="h1", units=384).apply(graph)  # Net2WiderNet
S.DeepenOp(after="h2").apply(graph)           # identity layer after a relu layer: exact
after = S.to_module(graph).eval()(x).detach()
print(S.describe_model(graph))
print("max |change| after widen + deepen:", float((after - before).abs().max()))

# A model is a source as a stack is: its layer nodes in order (S.load_model(path) of a run's
# model.safetensors, or in a recipe `sources: {m: runs/x/model.safetensors}`).
cut = S.build_graph([S.TakeOp(source="m", layers=(0, 2)), S.HeadOp(classes=5)], {"m": graph})
whole, part = S.to_module(graph).eval(), S.to_module(cut).eval()
assert torch.equal(part.h2(part.h1(x)), whole.h2(whole.h1(x)))
print(cut)
