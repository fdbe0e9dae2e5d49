"""Model surgery with the Python API: take two layers of one stack, transplant a layer
of another, widen and deepen function-preservingly, and check that the transplanted
layer computes exactly what it computed in its source.

    python examples/surgery_ops.py
"""

import torch

from surgery.graph import ModelGraph
from surgery.layers import LayerSpec
from surgery.stack import LayerStack, StackLayer


def random_stack(seed: int, sizes=(784, 256, 128, 64), act="relu") -> LayerStack:
    g = torch.Generator().manual_seed(seed)
    layers = [StackLayer(f"h{i + 1}", LayerSpec(in_features=a, out_features=b, activation=act),
                         {"weight": torch.randn(b, a, generator=g) * 0.05, "bias": torch.zeros(b)})
              for i, (a, b) in enumerate(zip(sizes, sizes[1:]))]
    return LayerStack(layers)


a, b = random_stack(1), random_stack(2)
graph = ModelGraph()
graph.take(a, 0, 2, source="a")          # layers [0, 2) of stack a: h1, h2
graph.take(b, 2, 3, source="b")          # layer 2 of stack b: h3
graph.head(10)
with torch.no_grad():
    graph.node("out").tensors["weight"].normal_()

x = torch.rand(16, 784)
net = graph.compile().eval()
inside = net.h3(net.h2(net.h1(x)))
assert torch.equal(inside, b[2].transform(a.transform(x, upto=2)))

before = net(x)
graph.widen("h1", 384)                    # Net2WiderNet
graph.deepen("h2")                        # identity layer after a relu layer: exact
after = graph.compile().eval()(x)
print(graph.summary())
print("max |change| after widen + deepen:", float((after - before).abs().max()))
