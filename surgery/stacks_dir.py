"""An experiment directory's greedy stacks, ``OUT/stacks/<key>/``: each pretrained once per
(arm, seed, data) at its largest depth and kept as a ``depthN`` snapshot after every layer
(the depth-N cells start from it) with ``rngN``, the generator state then; ``pretrain.json``
marks it whole, ``plan.json`` says what makes it (data, pretrain section, seed), ``taken.json``
what it took from another experiment's stack (``surgery run --stacks-from DIR``). A run
stopped mid-stack continues after the deepest layer it kept, and the stack equals the one an
unbroken run makes; a stack can also start from another experiment's where the two share
data, seed and their first layers. Where
populations are on, the stacks that share a layer plan (the seeds of an arm; arms of one
method) pretrain together.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import read_generator_state, save_generator_state
from .dataset import Dataset
from .devices import resolve_device
from .errors import ConfigError, ManifestError, SurgeryError, SurgeryWarning
from .grid import Cell, stack_key, stack_plan
from .io import atomic_path, progress_line, read_json, write_json
from .population import population_size
from .pretrain import greedy_pretrain
from .pretrain.greedy import PretrainConfig, greedy_pretrain_population
from .recipe import Recipe, recipe_from_dict
from .stack import LayerStack


def _pretrained_in(sdir: Path) -> tuple[float, int]:
    """The seconds a finished greedy stack took and its layers, as its ``pretrain.json``
    records them; ``ManifestError`` with what to do when that file is damaged."""
    fix = f" Delete {sdir} and run again: the stack is pretrained anew."
    meta = read_json(sdir / "pretrain.json", fix)
    seconds, layers = meta.get("seconds"), meta.get("layers")
    if not isinstance(seconds, (int, float)) or not isinstance(layers, int) or isinstance(layers, bool):
        raise ManifestError(f"{sdir / 'pretrain.json'}: seconds {seconds!r} and layers {layers!r} are not both "
                            f"numbers; the file is damaged.{fix}")
    return float(seconds), layers


TAKEN_FILE = "taken.json"  # in a stack directory: the layers it took from another experiment's stack, and whose


class StackStore:
    """The greedy stacks under ``root`` of an experiment run from ``recipe``; ``dataset(r)``
    gives a cell recipe's data (loaded once); ``donors``: other experiments' stacks a stack
    may start from."""

    def __init__(self, root: Path, recipe: Recipe, dataset: Callable[[Recipe], Dataset],
                 progress: bool | None = None, donors: StackDonors | None = None):
        self.root, self.recipe, self.dataset, self.progress = root, recipe, dataset, progress
        self.donors = donors

    def stack(self, cell: Cell, r: Recipe, data: Dataset) -> tuple[LayerStack, float]:
        """The depth-``cell.depth`` snapshot of the cell's greedy stack (trained on first
        use) and the pretraining seconds attributed to that depth."""
        sdir = self.root / str(cell.pretrain_key)
        spath = sdir / f"depth{cell.depth}.safetensors"
        if not (spath.is_file() and (sdir / "pretrain.json").is_file()):  # pretrain.json marks it finished
            assert r.pretrain is not None
            t0 = time.perf_counter()
            self._begin(sdir, stack_plan(cell.recipe))
            start = resume_point([sdir], len(r.pretrain.layers), self.progress)
            before = _spent_before(sdir, start[0][0]) if start else 0.0  # now: the stack grows as it trains
            st = greedy_pretrain(data.train.x, r.pretrain, r.seed, y=data.train.y, progress=self.progress,
                                 data_fingerprint=data.fingerprint(),
                                 on_layer=partial(save_snapshot, sdir),
                                 valid=(data.valid.x, data.valid.y), start=start[0] if start else None)
            seconds = time.perf_counter() - t0 + before
            write_json(sdir / "pretrain.json", {"seconds": round(seconds, 3), "layers": len(st)})
        seconds, layers = _pretrained_in(sdir)
        return LayerStack.load(spath), seconds * cell.depth / max(layers, 1)

    def pretrain_populations(self, cells: list[Cell], mode: str | int) -> None:
        """Pretrain the unfinished greedy stacks that share data and a layer plan (the seeds of
        an arm; arms of one method) together, in populations as large as ``mode`` allows
        (as for fine-tuning: ``auto`` on a GPU only); each stack is saved as alone."""
        if mode == "off" or (mode == "auto" and resolve_device(self.recipe.data.device, "data.device").type != "cuda"):
            return
        groups: dict[str, dict[str, tuple[Recipe, Dataset]]] = {}
        plans: dict[str, dict[str, Any]] = {}  # a stack's key -> what makes it
        widest: dict[str, int] = {}
        for cell in cells:
            key = cell.pretrain_key
            if key is None or (self.root / key / "pretrain.json").is_file():
                continue
            r = recipe_from_dict(cell.recipe, self.recipe.base_dir, f"{self.recipe.source} [{cell.condition}]")
            assert r.pretrain is not None
            bs = r.pretrain.batch_size
            plan = [(lc.method, lc.hidden, lc.epochs, lc.batch_size or bs) for lc in r.pretrain.layers]
            gkey = json.dumps([r.data.model_dump(mode="json"), plan], sort_keys=True)
            groups.setdefault(gkey, {})[key] = (r, self.dataset(r))
            plans[key] = stack_plan(cell.recipe)
            widest[gkey] = max(lc.hidden for lc in r.pretrain.layers)
        for gkey, group in groups.items():
            members = list(group.items())
            x = members[0][1][1].train.x
            # a member's own copy of its layer input, and its parameters, velocity and buffers
            size = population_size(mode, x.device, 4 * x.shape[0] * widest[gkey] + 16 * x[0].numel() * widest[gkey])
            for i in range(0, len(members), size):
                if len(members[i : i + size]) > 1:
                    self._pretrain_together(members[i : i + size], plans)

    def _begin(self, sdir: Path, plan: dict[str, Any]) -> None:
        """Before a stack pretrains: record what makes it (``plan.json``, which
        ``--stacks-from`` reads), and take the first layers a donor has of the same plan
        where it has more than ``sdir`` kept."""
        if not (sdir / "plan.json").is_file():
            write_json(sdir / "plan.json", plan)
        if self.donors is None:
            return
        found, kept = self.donors.deepest(plan), _kept_depth(sdir)
        if found is None and kept == 0:
            self._tell(f"pretrain: stack {sdir.name} (seed {plan.get('seed')}) takes nothing from --stacks-from: "
                       f"{self.donors.why_none(plan)}; it pretrains from layer 1")
        if found is None or found[1] <= kept:
            return
        src, depth = found
        for k in range(1, depth + 1):
            for name in (f"depth{k}.safetensors", f"rng{k}.safetensors"):
                if not (sdir / name).is_file():
                    with atomic_path(sdir / name) as tmp:
                        shutil.copyfile(src / name, tmp)
        write_json(sdir / TAKEN_FILE, {"from": str(src), "layers": depth})
        self._tell(f"pretrain: stack {sdir.name} starts from the first {depth} layer{'s' * (depth > 1)} of {src} "
                   "(the same data, seed and layers up to there)")

    def _tell(self, line: str) -> None:
        """A line on stderr, terminal or not, unless progress is off."""
        if self.progress is not False:
            print(line, file=sys.stderr, flush=True)

    def _pretrain_together(self, members: list[tuple[str, tuple[Recipe, Dataset]]],
                           plans: dict[str, dict[str, Any]]) -> None:
        data = members[0][1][1]
        dirs = [self.root / key for key, _ in members]
        cfgs = [r.pretrain for _, (r, _) in members]

        def snapshot(i: int, stacks: list[LayerStack], rngs: list[Tensor]) -> None:
            for sdir, st, rng in zip(dirs, stacks, rngs):
                save_snapshot(sdir, i, st, rng)

        t0 = time.perf_counter()
        for sdir, (key, _) in zip(dirs, members):
            self._begin(sdir, plans[key])
        try:
            start = resume_point(dirs, len(cfgs[0].layers), self.progress)
            before = [_spent_before(sdir, st) for sdir, (st, _) in zip(dirs, start)] if start else [0.0] * len(dirs)
            stacks = greedy_pretrain_population(
                data.train.x, cfgs, [r.seed for _, (r, _) in members], y=data.train.y, progress=self.progress,
                data_fingerprint=data.fingerprint(), on_layer=snapshot, valid=(data.valid.x, data.valid.y),
                start=start)
        except ConfigError:
            return  # members that cannot train together pretrain one by one when their cells run
        share = (time.perf_counter() - t0) / len(members)  # each stack's
        for i, (sdir, st) in enumerate(zip(dirs, stacks)):
            seconds = round(share + before[i], 3)
            write_json(sdir / "pretrain.json", {"seconds": seconds, "layers": len(st), "population": len(members)})


class StackDonors:
    """The greedy stacks of other experiment directories (``surgery run --stacks-from
    DIR``): a stack of this run whose data, seed, pretraining batch size and first ``d``
    layers are one of theirs starts from that one's depth-``d`` snapshot and generator
    state, as a resumed run does, and ends as it would have alone, bit for bit. What made
    a donor stack is its ``plan.json``, or (stacks made before plan.json was written) the
    ``recipe.json`` of a cell that took it."""

    def __init__(self, dirs: list[Path]):
        self.dirs = dirs
        self._kept: list[tuple[Path, list[dict[str, Any]]]] | None = None  # each donor stack's kept layers' prefixes
        self._index: dict[str, tuple[Path, int]] = {}

    def _donors(self) -> list[tuple[Path, list[dict[str, Any]]]]:
        """Each donor stack with the prefixes (:func:`prefixes`) of the layers it kept; read once."""
        if self._kept is None:
            self._kept = [(sdir, prefixes(made_by)[:_kept_depth(sdir)])
                          for d in self.dirs for sdir, made_by in _donor_plans(d).items()]
            for sdir, kept in self._kept:
                for depth, prefix in enumerate(kept, 1):
                    self._index.setdefault(_as_key(prefix), (sdir, depth))
        return self._kept

    def deepest(self, plan: dict[str, Any]) -> tuple[Path, int] | None:
        """The donor stack with the deepest snapshot that ``plan``'s stack would make too,
        and that depth; None when no donor shares even its first layer."""
        self._donors()
        keys = [_as_key(p) for p in prefixes(plan)]
        return next((self._index[k] for k in reversed(keys) if k in self._index), None)

    def why_none(self, plan: dict[str, Any]) -> str:
        """Why no donor shares ``plan``'s first layer: where the nearest one differs."""
        mine = prefixes(plan)[:1]
        nearest = None  # (differences, stack directory) of the donor with the fewest
        for sdir, kept in self._donors():
            if mine and kept:
                found = _differences(mine[0], kept[0])
                if nearest is None or len(found) < len(nearest[0]):
                    nearest = (found, sdir)
        if nearest is None:
            return "those directories hold no stack with a first layer to take"
        where, here, there = nearest[0][0]
        return f"the nearest, {nearest[1]}, has {where} {there!r} where this run has {here!r}"


def prefixes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """For each depth d of the stack ``plan`` (:func:`surgery.grid.stack_plan`) makes,
    what its first d layers depend on: data, seed, batch size, and the first d layers'
    settings with every default written out. Empty for a plan this version cannot read."""
    try:
        cfg = PretrainConfig.model_validate(plan["pretrain"])
        data, seed = plan["data"], plan["seed"]
    except (KeyError, TypeError, ValueError):  # pydantic's ValidationError is a ValueError
        return []
    layers = [lc.model_dump(mode="json") for lc in cfg.layers]
    return [{"data": data, "seed": seed, "pretrain": {"batch_size": cfg.batch_size, "layers": layers[:d]}}
            for d in range(1, len(layers) + 1)]


def _as_key(prefix: dict[str, Any]) -> str:
    return json.dumps(prefix, sort_keys=True, default=str)


def _differences(a: Any, b: Any, where: str = "") -> list[tuple[str, Any, Any]]:
    """Each place (a dotted path) where the nested dicts and lists ``a`` and ``b`` differ,
    with the two values there."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}.{i}")]
    return [] if a == b else [(where, a, b)]


def _donor_plans(d: Path) -> dict[Path, dict[str, Any]]:
    """Each greedy stack directory under experiment directory ``d`` with what made it."""
    plans: dict[Path, dict[str, Any]] = {}
    for cell_recipe in sorted(d.glob("cells/*/recipe.json")) + sorted(d.glob("tuning/*/recipe.json")):
        with suppress(ManifestError, KeyError):
            r = read_json(cell_recipe)
            if "pretrain" in r:
                plan = stack_plan(r)
                plans[d / "stacks" / stack_key(plan)] = plan
    for made_by in sorted(d.glob("stacks/*/plan.json")):
        with suppress(ManifestError):
            plans[made_by.parent] = read_json(made_by)
    return plans


def _kept_depth(sdir: Path) -> int:
    """The deepest layer whose snapshot and generator state ``sdir`` holds both of, from
    layer 1 on without a gap; 0 for none."""
    depth = 0
    while (sdir / f"depth{depth + 1}.safetensors").is_file() and (sdir / f"rng{depth + 1}.safetensors").is_file():
        depth += 1
    return depth


def continue_from(snapshots: Path, plan: dict[str, Any], layers: int, resume: bool,
                  progress: bool | None = None) -> tuple[LayerStack, Tensor] | None:
    """For a single run's stack kept in ``snapshots``: where ``resume`` continues (None: at
    layer 1). Its snapshots count only when ``plan`` (what makes the stack: the pretrain
    section, seed and data) is the one they were made by; otherwise, or when not resuming,
    they are cleared, with a warning where resuming was asked."""
    made_by = snapshots / "plan.json"
    same = made_by.is_file() and _plan(made_by) == plan
    kept = sorted(snapshots.glob("depth*.safetensors")) + sorted(snapshots.glob("rng*.safetensors"))
    if resume and kept and not same:
        warnings.warn(f"--resume: the layers kept in {snapshots} were pretrained by another pretrain section, seed "
                      "or data; pretraining starts again at layer 1.", SurgeryWarning, stacklevel=2)
    start = resume_point([snapshots], layers, progress) if resume and same else None
    if start is None:
        for f in kept:
            f.unlink()
    write_json(made_by, plan)
    return start[0] if start else None


def _plan(path: Path) -> dict[str, Any] | None:
    """What made a single run's kept layers (``plan.json``); None when damaged: not continued from."""
    try:
        return read_json(path)
    except ManifestError:
        return None


def save_snapshot(sdir: Path, i: int, stack: LayerStack, rng: Tensor) -> None:
    """Keep a greedy stack's first ``i + 1`` layers (the depth-(i+1) cells start from them)
    and the generator state after them, so a stopped pretraining can continue there."""
    stack.save(sdir / f"depth{i + 1}.safetensors")
    save_generator_state(sdir / f"rng{i + 1}.safetensors", rng)


def resume_point(dirs: list[Path], layers: int, progress: bool | None = None) -> list[tuple[LayerStack, Tensor]] | None:
    """Where an earlier run stopped pretraining these stacks (a population's, or one): each
    one's deepest usable snapshot that all of them reached, with its generator state; None
    to start at the first layer (nothing saved, or nothing usable). A snapshot that cannot
    be read is passed over for a shallower one, with a warning."""
    unusable = None  # why the first snapshot passed over was
    for depth in range(layers, 0, -1):
        files = [(d / f"depth{depth}.safetensors", d / f"rng{depth}.safetensors") for d in dirs]
        if not all(s.is_file() and g.is_file() for s, g in files):
            continue
        try:
            start = [(LayerStack.load(s), read_generator_state(g)) for s, g in files]
        except SurgeryError as e:
            unusable = unusable or str(e).splitlines()[0]
            continue
        if any(g.shape != _FRESH_STATE.shape or g.dtype != _FRESH_STATE.dtype or len(s) != depth for s, g in start):
            unusable = unusable or f"the snapshot {files[0][0]} and its generator state do not match this version's"
            continue
        if unusable:
            warnings.warn(f"pretraining continues after layer {depth}, the deepest snapshot it can use: a deeper "
                          f"one is unusable ({unusable})", SurgeryWarning, stacklevel=2)
        which = "the stack" if len(dirs) == 1 else f"{len(dirs)} stacks"
        progress_line(progress, f"pretrain: continuing {which} after layer {depth} of {layers}, where an earlier "
                                "run stopped")
        return start
    if unusable:
        warnings.warn(f"pretraining starts again at layer 1: a snapshot to continue from is unusable ({unusable})",
                      SurgeryWarning, stacklevel=2)
    return None


_FRESH_STATE = torch.Generator().get_state()


def _spent_before(sdir: Path, stack: LayerStack) -> float:
    """The pretraining seconds the layers of ``stack`` (where the stack in ``sdir`` continues
    from) recorded, less those of the first layers it took from another experiment's
    (``taken.json``): they were spent there and are counted in that experiment's report, so a
    merge of the two counts them once. Read before the stack continues: the layers trained
    then are appended to ``stack`` itself, and are this run's time."""
    taken = read_json(sdir / TAKEN_FILE) if (sdir / TAKEN_FILE).is_file() else {}
    n = taken.get("layers", 0) if isinstance(taken.get("layers"), int) else 0
    return float(sum(layer.pretrain.get("seconds", 0.0) for layer in stack.layers[n:]))
