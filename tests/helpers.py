"""Small builders shared by tests."""

import torch

from surgery.layers import LayerSpec
from surgery.stack import LayerStack, StackLayer


def random_stack(sizes=(784, 64, 32, 16), act="sigmoid", seed=0, prefix="h"):
    g = torch.Generator().manual_seed(seed)
    st = LayerStack(info={"seed": seed})
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        spec = LayerSpec(in_features=a, out_features=b, activation=act)
        st.append(StackLayer(f"{prefix}{i + 1}", spec, {
            "weight": torch.randn(b, a, generator=g) * 0.1,
            "bias": torch.randn(b, generator=g) * 0.1,
            "visible_bias": torch.randn(a, generator=g),
        }, {"method": "rbm", "epochs": 1, "history": [{"epoch": 1, "recon_error": 1.5}],
            "final": {"recon_error": 1.5}}))
    return st
