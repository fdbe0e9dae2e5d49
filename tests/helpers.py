"""Small builders shared by tests."""

from pathlib import Path

import torch
import yaml

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


def shrunk_recipe_args(recipes: Path, name: str, out: Path, device: str) -> list[str]:
    """The CLI arguments that run shipped recipe ``name`` (in the directory ``recipes``) small
    on ``device``: 300 examples, one seed, one epoch, small layers, a tuning batch of 2. What
    to shrink is read from the recipe's sections (not from words that its comments hold)."""
    recipe = yaml.safe_load((recipes / name).read_text())
    small = ["--set", f"data.device={device}", "--set", "data.limit=300"]
    if "experiment" in recipe:
        small += ["--set", "experiment.seeds=[0]", "--set", "experiment.pretrain_epochs=1",
                  "--set", "experiment.hidden=16"]
        if "tune" in recipe["experiment"]:
            small += ["--set", "experiment.tune.trials=2"]  # a batch of 2: a population on a GPU
    elif "pretrain" in recipe:
        layers = range(len(recipe["pretrain"]["layers"]))
        small += [a for i in layers for a in ("--set", f"pretrain.layers.{i}.epochs=1")]
    if "finetune" in recipe:
        small += ["--set", "finetune.epochs=1", "--set", f"finetune.device={device}"]
    cmd = ["search", "--trials", "1"] if "search" in recipe else ["run"]
    return [cmd[0], str(recipes / name), "--out", str(out), *cmd[1:], *small]


def shipped_recipe_order(recipes: Path) -> list[str]:
    """Every recipe file, the two that make the stacks ``transplant.yaml`` takes first."""
    first = ["dbn.yaml", "dae_stack.yaml"]
    return first + sorted(p.name for p in recipes.glob("*.yaml") if p.name not in first)
