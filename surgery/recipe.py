"""The top-level Recipe: composes each module's own config; its errors as one paragraph each;
loading a recipe file (its text read by :mod:`surgery.recipe_text`) with overrides.

Recipes are data: every section is a pydantic model defined next to the code that uses it.
Errors name the field path and the value: ``pretrain.layers.0.rbm.hidden: must be > 0 (got -5)``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .assembly import SurgeryConfig
from .data import DataConfig
from .errors import ConfigError
from .experiment_config import ExperimentConfig, file_name
from .fieldnames import field_hint, value_hint
from .finetune_config import FinetuneConfig
from .pretrain import PretrainConfig
from .recipe_text import apply_overrides, read_recipe_file
from .search_config import SearchConfig


class Recipe(BaseModel):
    """``name, seed, data, pretrain, surgery, finetune, experiment, search``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="run", description="names the default output directory, runs/<name>")
    seed: int = Field(default=0, ge=0)
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig | None = None
    surgery: SurgeryConfig | None = None
    finetune: FinetuneConfig | None = None
    experiment: ExperimentConfig | None = None
    search: SearchConfig | None = None

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="<recipe>")

    @field_validator("name")
    @classmethod
    def _one_directory_name(cls, name: str) -> str:
        """Outputs default to ``runs/<name>``, so the name is one directory's name: no
        ``/`` that nests it or ``..`` that leaves ``runs/``."""
        return file_name(name, "a recipe's name is its default output directory, runs/<name>", 200)

    @model_validator(mode="after")
    def _one_kind_of_run(self) -> Recipe:
        """An experiment builds each cell's network from its arms, so a pretrain:, surgery: or
        search: section beside it would be silently ignored."""
        beside = [s for s in ("pretrain", "surgery", "search") if getattr(self, s) is not None]
        if self.experiment is not None and beside:
            raise ValueError(f"experiment: builds every cell's network from its arms, so the "
                             f"{' and '.join(s + ':' for s in beside)} section{'s' if len(beside) > 1 else ''} "
                             "beside it would be ignored; remove "
                             f"{'them' if len(beside) > 1 else 'it'} (an arm sets its own pretraining and layers; "
                             "experiment.tune searches), or give the experiment a recipe of its own.")
        return self

    @model_validator(mode="after")
    def _needs_validation(self) -> Recipe:
        """Whatever chooses by validation error needs validation examples."""
        if self.data.dataset == "synthetic" or self.data.valid_size > 0:
            return self
        users = [name for name, on in (
            ("finetune.early_stopping", self.finetune is not None and self.finetune.early_stopping is not None),
            ("experiment.tune", self.experiment is not None and self.experiment.tune is not None),
            ("search", self.search is not None)) if on]
        if users:
            verb = "choose" if len(users) > 1 else "chooses"
            raise ValueError(f"{', '.join(users)} {verb} by validation error, but data.valid_size is 0 (no "
                             "validation examples). Keep a validation split (e.g. data.valid_size: 10000) or remove "
                             f"{' and '.join(users)}.")
        return self

    @property
    def base_dir(self) -> Path:
        """The directory relative paths in the recipe are resolved against."""
        return self._base_dir

    @property
    def source(self) -> str:
        """Where the recipe came from (its file, or a description), for error messages."""
        return self._source

    def resolve(self, path: str | Path) -> Path:
        """A path from the recipe, relative to the recipe file's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self._base_dir / p

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain JSON-able data (unset sections left out)."""
        return self.model_dump(mode="json", exclude_none=True)

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> Recipe:
        """A new recipe with ``dotted.path=value`` overrides applied and validated again."""
        data = self.to_dict()
        apply_overrides(data, overrides)
        return recipe_from_dict(data, self._base_dir, self._source)


Rename = Callable[[list[Any]], list[Any]]


def format_validation_error(e: ValidationError, source: str, data: Any = None, rename: Rename | None = None) -> str:
    """One paragraph from a pydantic error: each problem's field path, message and value. With
    the input ``data``, a field that may take several forms (a width or a list of widths) gets
    one line: the form its value has, not a line for each form it failed.

    ``rename``: the path the user wrote for a path of ``data`` (a grid cell's recipe is made
    from an experiment's sections: its ``pretrain.layers.2.lr`` may be the recipe's
    ``experiment.methods.rbm.lr``); a problem that renames to a line already said is said once."""
    problems: dict[Any, list[tuple[list[Any], dict[str, Any]]]] = {}
    for i, err in enumerate(e.errors()):
        path, union_at = _field_path(err, data) if data is not None else (list(err["loc"]), None)
        if err["type"] == "extra_forbidden" and data is not None:  # a misspelt or misplaced key: which was meant
            err = {**err, "msg": field_hint(Recipe, path, data) or err["msg"]}
        if err["type"] in _BOUNDS and _is_nan(err.get("input")):  # NaN fails every bound; "<= 100" misleads
            err = {**err, "msg": "Input should be a finite number, not NaN"}
        err = {**err, "msg": err["msg"] + value_hint(err)}
        key = ("union", tuple(path[:union_at])) if union_at is not None else i
        problems.setdefault(key, []).append((path, err))
    lines: list[str] = []
    for key, errs in problems.items():
        fitting = [(p, err) for p, err in errs if not _form_mismatch(err)]
        if len(errs) == 1 or fitting:
            said = [_problem(*_renamed(p, err["msg"], rename), err.get("input")) for p, err in (fitting or errs)]
            if fitting and isinstance(key, tuple):  # a wrong choice or type inside the form it has, besides
                inside = [(p, err) for p, err in errs if _form_mismatch(err) and len(p) > len(key[1])
                          and not any(q[:len(p)] == p for q, _ in fitting)]  # not a form of a fitting value
                said += [_problem(*_renamed(p, msg, rename), got) for p, msg, got in _forms_missed(inside)]
        else:  # the value has none of the forms: name them all, where it stopped in each
            said = [_problem(*_renamed(p, msg, rename), got) for p, msg, got in _forms_missed(errs)]
        lines += [line for line in said if line not in lines]
    n = len(lines)
    return f"{source}: {n} problem{'s' if n > 1 else ''} in the recipe:\n" + "\n".join(lines)


def _forms_missed(errs: list[tuple[list[Any], dict[str, Any]]]) -> list[tuple[list[Any], str, Any]]:
    """Each place a value that fits none of a union's forms went wrong, with what each form
    there wanted ("a valid integer; or a valid list"). A form whose inside the value reached
    (a key of a mapping, an item of a list: an error below it) is the form it has, and its
    own complaint that the value is not of that form is dropped."""
    inner = [(p, e) for p, e in errs if not any(len(q) > len(p) and q[:len(p)] == p for q, _ in errs)]
    at: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for p, e in inner:
        at.setdefault(tuple(p), []).append(e)
    return [(list(p), es[0]["msg"] + "".join(f"; or {e['msg'].removeprefix('Input should be ')}" for e in es[1:]),
             es[0].get("input")) for p, es in at.items()]


def _renamed(path: list[Any], msg: str, rename: Rename | None) -> tuple[list[Any], str]:
    """``path`` as ``rename`` gives it, and ``msg`` with the section it names renamed too (a
    hint lists "the fields of pretrain.layers.0")."""
    new = rename(path) if rename is not None else path
    if new == path:
        return path, msg
    same = 0  # the tail both paths share (the field, and what lies below it), short of the whole path
    while same < min(len(path) - 1, len(new)) and path[-1 - same] == new[-1 - same]:
        same += 1
    old_head, new_head = (".".join(str(p) for p in x[:len(x) - same]) for x in (path, new))
    return new, re.sub(rf"(?<![\w.-]){re.escape(old_head)}(?![\w-])", new_head, msg)


def _problem(path: list[Any], msg: str, got: Any) -> str:
    loc = ".".join(str(p) for p in path) or "(top level)"
    msg = msg.removeprefix("Value error, ")
    if isinstance(got, (dict, BaseModel)) and not msg.startswith("Input should be"):
        # a whole section: the message names what is wrong in it (but a number given a mapping shows it)
        return f"  - {loc}: {msg}"
    shown = json.dumps(got, default=str)
    return f"  - {loc}: {msg} (got {shown if len(shown) <= 80 else shown[:77] + '...'})"


def _field_path(err: dict[str, Any], data: Any) -> tuple[list[Any], int | None]:
    """The error's location without the names of union forms pydantic puts in it (found by
    walking the input: such a name is no key of it), and where the first one stood (None: the
    field is no union)."""
    path: list[Any] = []
    union_at = None
    obj = data
    for i, p in enumerate(err["loc"]):
        obj = dict(obj) if isinstance(obj, BaseModel) else obj
        if isinstance(obj, dict) and p in obj:
            obj = obj[p]
        elif isinstance(obj, list) and isinstance(p, int) and 0 <= p < len(obj):
            obj = obj[p]
        elif isinstance(p, str) and not (err["type"] == "missing" and i == len(err["loc"]) - 1):
            union_at = len(path) if union_at is None else union_at
            continue  # a form's name, not a field
        path.append(p)
    return path, union_at


_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of")


def _is_nan(value: Any) -> bool:
    """Whether ``value`` reads as NaN (``.nan`` in YAML, or the text ``nan``)."""
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _form_mismatch(err: dict[str, Any]) -> bool:
    """Whether the error says the value has another form than this one (a list for a number)."""
    t = err["type"]
    return t.endswith(("_type", "_parsing")) or t in ("literal_error", "none_required", "enum", "is_instance_of")


def recipe_from_dict(data: Any, base_dir: Path | None = None, source: str = "<recipe>",
                     rename: Rename | None = None) -> Recipe:
    """Validate ``data`` as a Recipe; ``ConfigError`` names every bad field and value (by
    the path the user wrote, with ``rename``: :func:`format_validation_error`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping of sections (data, pretrain, ...), got "
                          f"{type(data).__name__}.")
    try:
        r = Recipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, data, rename)) from None
    r._base_dir = Path(base_dir) if base_dir else Path.cwd()
    r._source = source
    return r


def load_recipe(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file (YAML, or JSON by suffix)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"surgery.load_recipe(path): takes a recipe file's path; got {type(path).__name__}. A dict "
                          "of sections is a recipe through surgery.recipe_from_dict(d).")
    data = read_recipe_file(path)
    if overrides:
        apply_overrides(data, overrides)
    return recipe_from_dict(data, Path(path).resolve().parent, str(path))


def as_recipe(recipe: Recipe | str | os.PathLike | dict[str, Any], where: str) -> Recipe:
    """What an API function (``where``, e.g. ``surgery.run``) was given as its recipe, as a
    Recipe: a recipe file's path is read (:func:`load_recipe`), a mapping validated
    (:func:`recipe_from_dict`); anything else is a ``ConfigError`` saying what to give."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    raise ConfigError(f"{where}: takes a recipe (surgery.load_recipe(path) or surgery.recipe_from_dict(...)), a "
                      f"recipe file's path or a dict of its sections; got {type(recipe).__name__}.")


def json_schema() -> dict[str, Any]:
    """The recipe's JSON Schema."""
    return Recipe.model_json_schema()
