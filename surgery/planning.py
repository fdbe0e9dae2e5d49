"""A recipe's network without training: the sources its ``surgery:`` section names, the
network assembled from them (:func:`assemble`), and the checks every command makes before it
trains (:func:`plan_network`: pretrained layers stand in untrained, at their shapes), of which
``surgery validate`` (:func:`validate`) says what it found."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .assembly import ForeignSource, SurgeryConfig, build_graph
from .data import load_dataset
from .dataset import Dataset
from .devices import resolve_device
from .errors import ConfigError, SurgeryError
from .graph import ModelGraph
from .grid import Cell, check_cells, check_search, plan_cells
from .loaders import find_mnist_file
from .model_file import load_model
from .ops import ForeignWeights, HeadOp, TakeOp
from .preflight import check_data, check_fits, check_patterns
from .pretrain.base import check_input
from .pretrain.greedy import plan_stack
from .recipe import Recipe, as_recipe
from .stack import LayerStack
from .weights_io import MODEL_FORMAT, load_foreign, read_manifest


def grid_hint(recipe: Recipe) -> str:
    """For an experiment recipe given to a single-network command: where its grid runs."""
    if recipe.experiment is None:
        return ""
    return (" This recipe is an experiment grid (its networks are built per cell from experiment:); "
            f"`surgery run {recipe.source}` (in Python, surgery.run_experiment) runs it.")


def nothing_to_assemble(recipe: Recipe) -> None:
    """Refuse a recipe with neither a ``pretrain:`` nor a ``surgery:`` section: no network to build."""
    raise SurgeryError(f"{recipe.source}: nothing to assemble: add a pretrain: or surgery: section."
                       f"{grid_hint(recipe)}")


def default_surgery(stack: LayerStack, classes: int) -> SurgeryConfig:
    """All pretrained layers + a softmax head: the DBN-style default."""
    return SurgeryConfig(ops=[TakeOp(op="take", source="pretrained"), HeadOp(op="head", classes=classes)])


def load_sources(recipe: Recipe, pretrained: LayerStack | None) -> dict[str, Any]:
    """The surgery section's sources by name (stacks, models and foreign weights), plus the
    ``pretrained`` stack when given; errors name ``surgery.sources.<name>``."""
    cfg = recipe.surgery
    out: dict[str, Any] = {}
    if pretrained is not None:
        out["pretrained"] = pretrained
    if cfg is None:
        return out
    for name, ref in cfg.sources.items():
        try:
            if isinstance(ref, ForeignSource):
                tensors, report = load_foreign(recipe.resolve(ref.path), ref.mapping())
                out[name] = ForeignWeights(tensors, report)
            else:  # a stack, or a fine-tuned or assembled model whose layers take and transplant copy
                path = recipe.resolve(ref)
                is_model = read_manifest(path).get("format") == MODEL_FORMAT
                out[name] = load_model(path) if is_model else LayerStack.load(path)
        except SurgeryError as e:
            raise SurgeryError(f"surgery.sources.{name}: {e}") from e
    used = {getattr(op, "source", None) for op in cfg.ops}
    if "pretrained" in used and pretrained is None:
        raise SurgeryError(
            "surgery: an op uses source 'pretrained' but the recipe has no pretrain: section to make it."
        )
    return out


def assemble(recipe: Recipe | str | Path, stack: LayerStack | None, classes: int,
             input_shape: tuple[int, ...] | None = None) -> ModelGraph:
    """The network the recipe's surgery section builds (default: every pretrained layer
    and a softmax head of ``classes``); ``input_shape`` is the data's, per example."""
    recipe = as_recipe(recipe, "surgery.assemble")
    uses = {getattr(op, "source", None) for op in recipe.surgery.ops} if recipe.surgery else {"pretrained"}
    if stack is None and recipe.pretrain is not None and "pretrained" in uses:
        raise ConfigError(f"surgery.assemble(recipe, stack, classes): {recipe.source}'s network is made of the "
                          "stack its pretrain: section makes; pass it: surgery.assemble(recipe, "
                          "surgery.pretrain(recipe), classes).")
    sources = load_sources(recipe, stack)
    cfg = recipe.surgery
    if cfg is None:
        if stack is None:
            nothing_to_assemble(recipe)
        cfg = default_surgery(stack, classes)
    return build_graph(cfg, sources, recipe.seed, input_shape)


def validate(recipe: Recipe | str | Path) -> tuple[ModelGraph | None, list[str]]:
    """Check the recipe (or the recipe file) and everything it refers to without training;
    return the planned graph (``None`` when the recipe has no network to build) and notes
    for the user."""
    recipe = as_recipe(recipe, "surgery.validate")
    notes = []
    cfg = recipe.data
    if cfg.dataset == "mnist" and cfg.path is None and find_mnist_file() is None:
        load_dataset(cfg)  # raises the how-to-get-MNIST error
    data = load_dataset(recipe.data.model_copy(update={"device": "cpu"}), recipe.base_dir)
    notes.append(f"data: {data.name}, train {tuple(data.train.x.shape)}, valid {len(data.valid)}, test "
                 f"{len(data.test)}")
    if recipe.finetune is not None:
        dev = resolve_device(recipe.finetune.device, "finetune.device")
        notes.append(f"finetune device: {dev}")
    stack = planned_stack(recipe, data)
    if stack is not None:
        plan = " -> ".join(f"{s.name}:{s.pretrain['method']}{s.spec.output_shape}" for s in stack)
        notes.append("pretrain plan: " + plan)
    if recipe.experiment is not None:
        cells = plan_cells(recipe, data.input_shape, data.num_classes)
        def cell_data(r: Recipe) -> Dataset:  # the data loaded above, unless an arm has its own
            own = r.data.model_copy(update={"device": "cpu"})
            return data if own == recipe.data.model_copy(update={"device": "cpu"}) else load_dataset(own, r.base_dir)

        check_grid(recipe, cells, cell_data)
        exp = recipe.experiment
        plural = "s" if len(cells) != 1 else ""
        notes.append(f"experiment: {len(cells)} cell{plural} ({', '.join(exp.arms())} x depths {exp.depths} x "
                     f"seeds {exp.seeds})")
        if exp.tune is not None:
            groups = len({(c.condition, c.depth) for c in cells})
            on = (f"seed {exp.seeds[0]}" if exp.tune.seeds == 1 else
                  f"seeds {', '.join(map(str, exp.seeds[:exp.tune.seeds]))}, scored by their mean")
            steps = [s for s in exp.tune.then if any(s.applies_to(arm) for arm in exp.arms())]  # for arms here
            more = sum(exp.tune.step_runs(arm) for arm, _ in {(c.condition, c.depth) for c in cells}) * exp.tune.seeds
            then = (f"; then {len(steps)} step(s) ({'; '.join(s.name for s in steps)}: up to {more} runs more, each "
                    "alternative over the values chosen so far, the lowest validation error kept)" if steps else "")
            notes.append(f"tuning first: {exp.tune.trials} {exp.tune.sampler} trials for each of {groups} "
                         f"(arm, depth) on {on} ({exp.tune.trials * exp.tune.seeds * groups} runs) over "
                         f"{', '.join(exp.tune.params)}{then}; then every seed with its arm's "
                         f"{'chosen' if steps else 'best'} values")
    check_search(recipe)
    if recipe.surgery is None and stack is None:
        return None, notes
    graph = _planned_graph(recipe, stack, data)
    notes += graph.report
    return graph, notes


def check_grid(recipe: Recipe, cells: list[Cell], dataset: Callable[[Recipe], Dataset]) -> None:
    """Before an experiment trains: each (arm, depth)'s first cell as a recipe, with each tuned
    parameter at the ends of its range (:func:`grid.check_cells`), and its network planned and
    checked as fine-tuning will check it (:func:`plan_network`; ``dataset``: a cell recipe's data)."""
    if recipe.finetune is not None:  # the grid's own device: said once, not as its first cell's
        try:
            resolve_device(recipe.finetune.device, "finetune.device")
        except SurgeryError as e:
            raise type(e)(f"{recipe.source}: {e}") from None
    for (arm, depth), r in check_cells(recipe, cells).items():
        try:
            plan_network(r, dataset(r))
        except SurgeryError as e:
            raise type(e)(f"{recipe.source} [{arm} d{depth}]: {e}") from None


def plan_network(recipe: Recipe, data: Dataset) -> ModelGraph | None:
    """The network the recipe builds, planned without training (pretrained layers stand in
    untrained, at their shapes) and checked as fine-tuning will check it; None when the recipe
    builds none. Runs call it before pretraining, so a fine-tuning option that cannot apply
    fails before hours of pretraining, not after (a fine-tuning device this machine lacks too)."""
    if recipe.finetune is not None:
        resolve_device(recipe.finetune.device, "finetune.device")
    return check_network(recipe, data)


def check_network(recipe: Recipe, data: Dataset) -> ModelGraph | None:
    """:func:`plan_network` without the fine-tuning device: what ``surgery assemble`` checks
    before it pretrains (the network fits the data; the layers and patterns it names exist)."""
    stack = planned_stack(recipe, data)
    if recipe.surgery is None and stack is None:
        return None
    return _planned_graph(recipe, stack, data)


def planned_stack(recipe: Recipe, data: Dataset) -> LayerStack | None:
    """The recipe's greedy stack as planned (layers of the right shapes, untrained), or None."""
    if recipe.pretrain is None:
        return None
    try:
        stack = plan_stack(recipe.pretrain, data.input_shape)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if any(lc.method == "conv_ae" for lc in recipe.pretrain.layers) and len(data.input_shape) != 3:
        raise SurgeryError("pretrain: conv_ae layers need images; set data.flatten: false.")
    check_input(recipe.pretrain.layer_name(0), recipe.pretrain.layers[0], data.train.x)
    return stack


def _planned_graph(recipe: Recipe, stack: LayerStack | None, data: Dataset) -> ModelGraph:
    """The network assembled on ``stack`` (planned or trained), checked as fine-tuning will
    check it: it fits the data, and every layer pattern of ``finetune:`` names a layer."""
    check_data(data)  # what Trainer would refuse
    graph = assemble(recipe, stack, data.num_classes, data.input_shape)
    check_fits(graph, data)
    if recipe.finetune is not None:
        check_patterns([n.name for n in graph.nodes() if n.kind == "layer"], recipe.finetune)
    return graph
