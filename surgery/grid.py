"""Planning an experiment grid: every (arm, depth, seed) cell as a full recipe dict.

Every arm of a seed sees the same data order (the fine-tuning shuffle is seeded by the
seed alone) and the same fine-tuning budget; the no-pretraining arm starts from the
classic initialisation for its activation. Greedy stacks are planned once per (arm, seed)
at the largest depth (``Cell.pretrain_key``); the depth-d stack is the snapshot after its
d-th layer, which for layer-wise methods is exactly what a depth-d run trains.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import ConfigError, SurgeryError
from .experiment_config import DEFAULT_LAYER, ArmConfig, ExperimentConfig, scale_of
from .finetune_config import LAYER_PATTERN_FIELDS, FinetuneConfig
from .recipe import Recipe, Rename, as_recipe, recipe_from_dict
from .recipe_text import apply_overrides
from .search_config import ParamRange


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Cell(BaseModel):
    """One (arm, depth, seed) of a grid: its full recipe and the key of the stack it pretrains."""
    condition: str
    depth: int
    seed: int
    recipe: dict[str, Any]
    pretrain_key: str | None

    @property
    def key(self) -> str:
        """A hash of the cell's recipe: its directory name, so finished cells are found again."""
        return _hash(self.recipe)


def stack_plan(recipe: dict[str, Any]) -> dict[str, Any]:
    """What makes a cell's greedy stack, from the cell's recipe: its data, pretrain section
    and seed (``Cell.pretrain_key`` is a hash of it)."""
    return {"data": recipe["data"], "pretrain": recipe["pretrain"], "seed": recipe["seed"]}


def stack_key(plan: dict[str, Any]) -> str:
    """The name of the directory of the greedy stack ``plan`` (:func:`stack_plan`) makes."""
    return _hash(plan)


def _widths(name: str, hidden: int | list[int], depth: int) -> list[int]:
    """Units of hidden layers 1..``depth``: one width for all, or the first ``depth`` of a list."""
    if isinstance(hidden, int):
        return [hidden] * depth
    if len(hidden) < depth:
        raise SurgeryError(f"experiment.conditions.{name}: hidden lists {len(hidden)} widths {hidden} but the arm "
                           f"runs depth {depth}; give one width per layer up to the largest depth.")
    return list(hidden[:depth])


def _pretrain_section(arm: ArmConfig, exp: ExperimentConfig, widths: list[int], act: str) -> dict | None:
    """The greedy stack an arm pretrains (one layer per width), or ``None`` for ``method: none``."""
    if arm.method == "none":
        return None
    layer = {"method": arm.method, "epochs": exp.pretrain_epochs,
             **DEFAULT_LAYER.get(arm.method, {}), **exp.methods.get(arm.method, {}), **arm.layer}
    if arm.method == "grow":
        layer["train"] = arm.train
    if arm.method not in ("rbm", "grbm"):
        layer.setdefault("activation", act)
    layers = [{**layer, "hidden": w} for w in widths]
    if arm.conv is not None:
        c = arm.conv
        first = {"method": "conv_ae", "hidden": c.maps, "kernel_size": c.kernel_size, "stride": c.stride,
                 "epochs": exp.pretrain_epochs, "lr": 0.01, "activation": act}
        layers[0] = {**first, **exp.methods.get("conv_ae", {})}
    return {"batch_size": exp.pretrain_batch_size, "layers": layers}


def _fresh_ops(arm: ArmConfig, widths: list[int], act: str, input_shape: tuple[int, ...]) -> list[dict]:
    """``insert`` ops for freshly initialised hidden layers of ``widths`` (no pretraining)."""
    ops: list[dict[str, Any]] = []
    for i, width in enumerate(widths):
        op: dict[str, Any] = {"op": "insert", "name": f"h{i + 1}", "units": width, "activation": act}
        if i == 0 and arm.conv is not None:
            c = arm.conv
            side = int(math.isqrt(math.prod(input_shape)))
            img = input_shape if len(input_shape) == 3 else (1, side, side)
            op.update(kind="conv2d", units=c.maps, kernel_size=c.kernel_size, stride=c.stride, in_shape=list(img))
        elif i == 0:
            op["in_features"] = math.prod(input_shape)
        ops.append(op)
    return ops


def plan_cells(recipe: Recipe | str | Path | dict[str, Any], input_shape: tuple[int, ...], classes: int) -> list[Cell]:
    """Materialise every (arm, depth, seed) cell as a full recipe dict (``recipe``: a Recipe,
    its file's path or a dict of its sections, with an experiment: section)."""
    recipe = as_recipe(recipe, "surgery.plan_cells")
    if recipe.experiment is None:
        raise ConfigError(f"surgery.plan_cells: {recipe.source} has no experiment: section; its cells are the arms x "
                          "depths x seeds that section lists.")
    exp: ExperimentConfig = recipe.experiment
    if recipe.finetune is None:
        raise SurgeryError("experiment: a comparison needs a finetune: section (the budget every arm gets).")
    base = recipe.to_dict()
    for k in ("experiment", "pretrain", "surgery", "search"):
        base.pop(k, None)
    head = {"op": "head", "classes": classes}
    cells = []
    matched: dict[tuple[str, str], bool] = {}  # (finetune field, layer pattern) -> matched in some cell
    for name, arm in exp.arms().items():
        depths = [arm.fixed_depth] if arm.fixed_depth else exp.depths
        hidden = arm.hidden or (exp.shallow_hidden if arm.fixed_depth and exp.shallow_hidden else exp.hidden)
        act = arm.activation or exp.activation
        if arm.conv is not None and arm.data.get("flatten", base["data"].get("flatten", True)):
            raise SurgeryError(f"experiment.conditions.{name}.conv: a conv first layer needs images; add data: "
                               f"{{flatten: false}} to the arm.")
        widths = _widths(name, hidden, max(depths))
        pre = _pretrain_section(arm, exp, widths, act)
        for seed in exp.seeds:
            for depth in depths:
                r = json.loads(json.dumps(base))
                r["seed"] = seed
                r["name"] = f"{name}-d{depth}-s{seed}"
                r["finetune"] = _patterns_for(_spelled_out({**r.get("finetune", {}), **arm.finetune}),
                                              [f"h{i + 1}" for i in range(depth)] + ["out"],  # the head's name
                                              matched)
                r["data"] = {**r["data"], **arm.data}
                if pre is not None:
                    r["pretrain"] = pre
                    r["surgery"] = {"ops": [{"op": "take", "source": "pretrained", "layers": [0, depth]}, head]}
                else:
                    r["surgery"] = {"ops": [*_fresh_ops(arm, widths[:depth], act, input_shape), head]}
                pkey = stack_key(stack_plan(r)) if pre else None
                cells.append(Cell(condition=name, depth=depth, seed=seed, recipe=r, pretrain_key=pkey))
    missed = [f"finetune.{field}: {pattern!r}" for (field, pattern), hit in matched.items() if not hit]
    if missed:
        deepest = max(c.depth for c in cells)
        layers = "h1" if deepest == 1 else f"h1 ... h{deepest}"
        raise ConfigError(f"{recipe.source}: {missed[0]} matches no layer of any cell of the grid (the deepest cell's "
                          f"layers are {layers} and out); name a layer one of its depths has, or remove it.")
    return cells


def _patterns_for(finetune: dict[str, Any], names: list[str], matched: dict[tuple[str, str], bool]) -> dict[str, Any]:
    """``finetune`` with each layer pattern (``layer_lr``, ``dropout``, ...) kept only where
    it matches one of the cell's layers ``names``: the depths of a grid have different layers,
    and ``dropout: {h3: 0.5}`` concerns the cells with a third. ``matched`` records, per
    pattern, whether some cell has a layer it matches (one that none has is an error)."""
    out = dict(finetune)
    for field in LAYER_PATTERN_FIELDS:
        if not isinstance(out.get(field), dict):
            continue  # an invalid section: the cell's recipe names the problem when it is read
        kept = {}
        for pattern, value in out[field].items():
            hit = any(fnmatch.fnmatchcase(n, pattern) for n in names)
            matched[(field, pattern)] = matched.get((field, pattern), False) or hit
            if hit:
                kept[pattern] = value
        out[field] = kept
    return out


def _spelled_out(finetune: dict[str, Any]) -> dict[str, Any]:
    """The finetune section with every default written out, so an arm that overrides
    ``optimizer: {name: sgd, lr: 0.1}`` gets the same cell (and key) as the same values
    written in full. Left as it is when invalid: the cell's recipe then fails with the arm
    named when it is read."""
    try:
        return FinetuneConfig.model_validate(finetune).model_dump(mode="json", exclude_none=True)
    except ValidationError:
        return finetune


def _set_path(r: dict[str, Any], path: str, value: Any) -> None:
    """``a.b.0.c = value``; a ``*`` step sets every item of a list (``pretrain.layers.*.lr``)."""
    try:
        paths = _each_path(r, path)
    except SurgeryError as e:
        raise SurgeryError(f"experiment.tune.params[{path!r}]: {e}.") from None
    for each in paths:
        apply_overrides(r, {each: value})


def with_values(cell: Cell, values: dict[str, Any]) -> Cell:
    """``cell`` with ``values`` (dotted path -> value) set in its recipe; a changed
    pretrain section gets its own stack key."""
    r = json.loads(json.dumps(cell.recipe))
    for path, value in values.items():
        if path.startswith("pretrain") and "pretrain" not in r:
            continue  # a pretraining value means nothing to an arm that does not pretrain
        _set_path(r, path, value)
    pkey = stack_key(stack_plan(r)) if "pretrain" in r else None
    return Cell(condition=cell.condition, depth=cell.depth, seed=cell.seed, recipe=r, pretrain_key=pkey)


_MISSING = object()


def _get_path(r: Any, path: str) -> Any:
    """The value at ``a.b.0.c`` in nested dicts and lists, or ``_MISSING``."""
    for part in path.split("."):
        if isinstance(r, dict) and part in r:
            r = r[part]
        elif isinstance(r, list) and part.isdigit() and int(part) < len(r):
            r = r[int(part)]
        else:
            return _MISSING
    return r


def _each_path(full: dict[str, Any], path: str) -> list[str]:
    """``path`` with a ``*`` step written out for every item of its list in ``full``."""
    head, _, rest = path.partition(".*.")
    if not rest:
        return [path]
    items = _get_path(full, head)
    if not isinstance(items, list):
        raise SurgeryError(f"{head} is not a list in this cell's recipe")
    return [p for i in range(len(items)) for p in _each_path(full, f"{head}.{i}.{rest}")]


def step_values(full: dict[str, Any], alternative: dict[str, Any]) -> dict[str, Any]:
    """An ``experiment.tune.then`` alternative as the values it sets in a cell whose whole
    recipe (defaults included) is ``full``: a ``{times: X}`` value becomes X times the
    value there (each layer's own, for a ``*`` path, which stays one path where every layer
    has the same value; the nearest whole number for a field of whole numbers, such as
    epochs); pretraining values are left out for a cell that does not pretrain.
    ``SurgeryError`` when a scaled path holds no number."""
    values: dict[str, Any] = {}
    for path, value in alternative.items():
        if path.startswith("pretrain") and "pretrain" not in full:
            continue
        factor = scale_of(value)
        if factor is None:
            values[path] = value
            continue
        scaled = {}
        for each in _each_path(full, path):
            now = _get_path(full, each)
            if isinstance(now, bool) or not isinstance(now, (int, float)):
                raise SurgeryError(f"{path}: {{times: {factor}}} needs a number there, and this cell's recipe has "
                                   f"{'nothing' if now is _MISSING else repr(now)} at {each}")
            # ``full`` is validated: a float field holds a float there, so an int is a field of whole numbers
            scaled[each] = round(now * factor) if isinstance(now, int) else now * factor
        same = len(set(scaled.values())) == 1
        values.update({path: next(iter(scaled.values()))} if same and "*" in path else scaled)
    return values


def changes(full: dict[str, Any], values: dict[str, Any]) -> bool:
    """Whether setting ``values`` changes the whole recipe ``full`` (a step's alternative
    that would not is not run)."""
    return any(_get_path(full, each) != value for path, value in values.items() for each in _each_path(full, path))


def first_cells(cells: list[Cell]) -> dict[tuple[str, int], Cell]:
    """Each (arm, depth)'s first cell (its first seed's), in plan order."""
    firsts: dict[tuple[str, int], Cell] = {}
    for c in cells:
        firsts.setdefault((c.condition, c.depth), c)
    return firsts


def check_cells(recipe: Recipe, cells: list[Cell]) -> dict[tuple[str, int], Recipe]:
    """Validate the recipe of each (arm, depth)'s first cell, and with each of
    ``experiment.tune.params`` set in it, and each alternative of ``experiment.tune.then``,
    before anything trains: a bad arm override or a tuned path that is not a recipe field
    fails now, named, not after the first stacks. Returns those first cells' recipes."""
    exp = recipe.experiment
    assert exp is not None
    checked = {}
    for (arm, depth), cell in first_cells(cells).items():
        checked[arm, depth] = recipe_from_dict(cell.recipe, recipe.base_dir, f"{recipe.source} [{arm} d{depth}]",
                                               rename=written_as(exp, arm, cell.recipe))
        if exp.tune is not None:
            check_ranges("experiment.tune.params", exp.tune.params, recipe, f" [{arm} d{depth}]",
                         lambda path, value, cell=cell: with_values(cell, {path: value}).recipe)
            _check_steps(recipe, exp, cell, checked[arm, depth].to_dict())
    return checked


def _check_steps(recipe: Recipe, exp: ExperimentConfig, cell: Cell, full: dict[str, Any]) -> None:
    """Validate ``cell``'s recipe (``full``: with its defaults) with each alternative of the
    ``experiment.tune.then`` steps that apply to its arm set in it."""
    where = f" [{cell.condition} d{cell.depth}]"
    for i, step in enumerate(exp.tune.then if exp.tune is not None else []):
        for j, alternative in enumerate(step.alternatives if step.applies_to(cell.condition) else []):
            field = f"experiment.tune.then[{i}].alternatives[{j}]"
            try:
                data = with_values(cell, step_values(full, alternative)).recipe
            except SurgeryError as e:  # with_values names the path as a tuned parameter's: said here as ours
                said = str(e).split(": ", 1)[-1] if str(e).startswith("experiment.tune.params[") else str(e)
                raise ConfigError(f"{field}{where}: {said}") from None
            recipe_from_dict(data, recipe.base_dir, f"{recipe.source}{where} with {field}")


def written_as(exp: ExperimentConfig, name: str, cell_recipe: dict[str, Any]) -> Rename:
    """Where the experiment recipe holds what a path of arm ``name``'s cell recipe holds:
    ``finetune.X`` and ``data.X`` the arm overrides are ``experiment.conditions.NAME...``;
    a pretraining layer's field is the arm's ``layer`` or ``experiment.methods.METHOD``
    (one line for all the layers it made); anything else is where the cell has it."""
    arm = exp.arms()[name]
    layers = (cell_recipe.get("pretrain") or {}).get("layers") or []

    def rename(path: list[Any]) -> list[Any]:
        if len(path) > 1 and path[1] in {"finetune": arm.finetune, "data": arm.data}.get(path[0], {}):
            return ["experiment", "conditions", name, *path]
        if path[:2] != ["pretrain", "layers"] or len(path) < 4 or not isinstance(path[2], int) \
                or path[2] >= len(layers):
            return path
        method = layers[path[2]].get("method")
        if path[3] in arm.layer and method != "conv_ae":  # a conv first layer is the arm's conv, not its layer
            return ["experiment", "conditions", name, "layer", *path[3:]]
        if path[3] in exp.methods.get(method, {}):
            return ["experiment", "methods", method, *path[3:]]
        return path

    return rename


def _starred(param: str) -> Rename:
    """A tuned or searched ``param`` that sets every layer (``pretrain.layers.*.noise``): the
    paths it set in each layer as that one path."""
    head, _, rest = param.partition(".*.")
    n = len(head.split("."))

    def rename(path: list[Any]) -> list[Any]:
        if rest and ".".join(map(str, path[:n])) == head and ".".join(map(str, path[n + 1:])) == rest:
            return [*path[:n], "*", *path[n + 1:]]
        return path

    return rename


def check_ranges(field: str, params: dict[str, ParamRange], recipe: Recipe, where: str,
                 set_value: Callable[[str, Any], dict[str, Any]]) -> None:
    """Validate the recipe ``set_value(path, value)`` makes for every parameter of a search
    (``field``: its name in the recipe) at the ends of its range; ``ConfigError`` naming the
    parameter (and ``where``: the cell) when a path is not in the recipe or a value not allowed."""
    for path, rng in params.items():
        for value in _ends(rng):
            try:
                data = set_value(path, value)
            except SurgeryError as e:
                raise ConfigError(f"{field}[{path!r}]{where}: {str(e).split(': ', 1)[-1]}") from None
            recipe_from_dict(data, recipe.base_dir, f"{recipe.source}{where} with {field}[{path!r}]",
                             rename=_starred(path))


def check_search(recipe: Recipe) -> None:
    """:func:`check_ranges` for the recipe's ``search:`` section (none: nothing to check)."""
    if recipe.search is None:
        return
    base = recipe.to_dict()
    base.pop("search", None)
    check_ranges("search.params", recipe.search.params, recipe, "",
                 lambda path, value: apply_overrides(json.loads(json.dumps(base)), {path: value}))


def _ends(rng: ParamRange) -> list[Any]:
    """Values the search can draw for ``rng`` that bound what it may draw: every choice, or
    both ends of the range."""
    if rng.type == "categorical":
        return list(rng.choices or [])
    ends = [rng.low, rng.high]
    return [int(v) for v in ends] if rng.type == "int" else ends  # type: ignore[arg-type]


def shard_of(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """The cells shard ``index`` of ``count`` (0-based) trains: cells that share a greedy
    stack stay together (one process pretrains it), and those groups are dealt out in plan
    order, so every process that plans the same cells takes the same share."""
    groups: dict[str, int] = {}
    for c in cells:
        groups.setdefault(c.pretrain_key or c.key, len(groups))
    return [c for c in cells if groups[c.pretrain_key or c.key] % count == index]


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (1 <= I <= N) as the 0-based ``(index, count)``; a clear error otherwise."""
    parts = text.split("/")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        i, n = int(parts[0]), int(parts[1])
        if 1 <= i <= n:
            return i - 1, n
    raise SurgeryError(f"--shard {text!r}: give I/N with 1 <= I <= N, e.g. --shard 1/2 and --shard 2/2 for two "
                       "processes sharing one --out directory.")
