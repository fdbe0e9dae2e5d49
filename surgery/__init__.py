"""surgery: greedy layer-wise pretraining and model surgery for PyTorch.

The public API, the same objects the recipes are made of::

    import surgery as S

    data = S.load_dataset(S.DataConfig(dataset="mnist", limit=5000))
    stack = S.greedy_pretrain(data.train.x, S.PretrainConfig(layers=[{"method": "rbm", "hidden": 500}]))
    graph = S.build_graph([S.TakeOp(source="rbm"), S.HeadOp(classes=10)], {"rbm": stack})
    result = S.Trainer(graph, data, S.FinetuneConfig(epochs=5)).fit()

Recipes: ``S.load_recipe(path)`` then ``S.run(recipe, out)`` (one network) or
``S.run_experiment(recipe, out)`` and ``S.write_report(out, rows)`` (a grid).

Each name is imported from its module on first use: ``__init__.pyi`` lists them (and is
what type checkers read), so ``import surgery`` and ``surgery --help`` are quick and
torch loads only when something needs it.
"""

from __future__ import annotations

import ast
import importlib
import sys
import types
from pathlib import Path
from typing import Any


def _public_names() -> dict[str, str]:
    """Each public name -> the module that defines it, from the ``from .module import ...``
    lines of ``__init__.pyi``."""
    tree = ast.parse((Path(__file__).parent / "__init__.pyi").read_text(encoding="utf-8"))
    return {alias.asname or alias.name: node.module for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
            for alias in node.names}


_WHERE = _public_names()
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    """The public names (what tab completion offers), not this file's helpers (``Path``, ``ast``)."""
    return sorted({n for n in globals() if n.startswith("__")} | set(__all__))


class _Package(types.ModuleType):
    """The package module, which keeps its public names when a submodule of the same name
    loads: the import system sets ``surgery.pretrain`` to the subpackage when it first loads
    it, and the public ``surgery.pretrain`` is the function (``pipeline.pretrain``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and _WHERE[name] != name and isinstance(value, types.ModuleType):
            return  # the subpackage stays reachable as sys.modules["surgery.pretrain"] and by `from`
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
