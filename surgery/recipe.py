"""The top-level Recipe: composes each module's own config; YAML/JSON loading; overrides.

Recipes are data: every section is a pydantic model defined next to the code that uses it.
Errors name the field path and the value: ``pretrain.layers.0.rbm.hidden: must be > 0 (got -5)``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .assembly import SurgeryConfig
from .data import DataConfig
from .errors import ConfigError
from .experiment_config import ExperimentConfig, file_name
from .fieldnames import field_hint, value_hint
from .finetune_config import FinetuneConfig
from .pretrain import PretrainConfig
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


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: YAML keeps the last one
    silently, so ``epochs: 50`` above a forgotten ``epochs: 5`` would train 5."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}  # key -> the line it was first given on
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` then a key of its own: an override, as meant
            key = self.construct_object(key_node, deep=True)
            try:
                twice = key in seen
            except TypeError:
                continue  # an unhashable key: the constructor below says so
            if twice:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping (first on line {seen[key]}); YAML would keep "
                    "only the last, so remove one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML's) reads 1e-3 and 5e3 as strings, wanting a dot (1.0e-3): read them as
# the numbers they look like, as YAML 1.2 and JSON do (a categorical choice of [1e-4, 1e-5]
# was a list of strings, data.limit: 5e3 "not a valid integer").
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``['a.b=1', ...]`` -> ``{'a.b': 1}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write it as dotted.path=value (e.g. pretrain.layers.0.epochs=3).")
        key, _, raw = item.partition("=")
        if "" in key.strip().split("."):
            raise ConfigError(f"--set {item!r}: the path before '=' has an empty part; name a recipe field, "
                              "e.g. finetune.epochs=3.")
        try:
            out[key.strip()] = yaml.load(raw, Loader=_RecipeLoader) if raw.strip() else None  # noqa: S506
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({_syntax(e)}); a text holding ': ', "
                              f"' #' or a leading quote or bracket needs quotes round it: "
                              f"--set '{key.strip()}=\"...\"'.") from None
    return out


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; ``ValueError`` for a key given twice (JSON keeps the last)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"{k!r} is given twice in one object; JSON would keep only the last, so remove one")
        out[k] = v
    return out


def _syntax(e: yaml.YAMLError | json.JSONDecodeError) -> str:
    """A YAML or JSON syntax error in one line: where (1-based line and column) and what."""
    if isinstance(e, json.JSONDecodeError):
        return f"line {e.lineno}, column {e.colno}: {e.msg}"
    mark = getattr(e, "problem_mark", None)
    what = ": ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Set ``a.b.0.c = value`` paths in a nested dict/list in place (lists by index).

    A list of names set onto a mapping that holds every one of them keeps those entries, in
    the list's order: ``experiment.conditions=[rbm-cg]`` runs one of the recipe's own arms.
    A mapping's own dotted keys (a search's ``finetune.optimizer.lr``) are matched whole:
    ``search.params.finetune.optimizer.lr.low=0.01``; a path the params lack is a new one:
    ``search.params.finetune.optimizer.momentum={type: float, low: 0, high: 0.9}``.
    """
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in overrides.items():
        _set_path(data, key, value)
    return data


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set one dotted ``key`` of :func:`apply_overrides` to ``value``; a missing section on
    the way is made, a list is entered by index."""
    parts = key.replace("\\.", ".").split(".")  # a dot escaped as in some tools' paths is a dot: keys match whole
    cur: Any = data
    i = 0
    while True:
        if isinstance(cur, dict):
            parts[i:] = _dotted_key(cur, parts[i:])
            if i and parts[i - 1] == "params" and parts[i] not in cur:  # a new searched path, whole
                parts[i:] = [".".join(parts[i:])]
        part, last = parts[i], i == len(parts) - 1
        if isinstance(cur, list):
            try:
                idx = int(part)
                cur[idx]
            except (ValueError, IndexError):
                raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(cur)}.") from None
            if last:
                cur[idx] = value
                return
            cur = cur[idx]
        elif isinstance(cur, dict):
            if last:
                cur[part] = copy.deepcopy(_selected(cur.get(part), value))
                return
            if cur.get(part) is None:
                cur[part] = {}
            cur = cur[part]
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section.")
        i += 1


def _dotted_key(mapping: dict[str, Any], parts: list[str]) -> list[str]:
    """``parts`` with its longest head that is one of ``mapping``'s dotted keys joined into one."""
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in mapping:
            return [".".join(parts[:n]), *parts[n:]]
    return parts


def _selected(old: Any, value: Any) -> Any:
    """``value``, or the entries of mapping ``old`` it names when it is a list of ``old``'s keys."""
    if (isinstance(old, dict) and isinstance(value, list) and value
            and all(isinstance(v, str) and v in old for v in value)):
        return {v: old[v] for v in value}
    return value


# The suffixes of the files read as recipes (.json as JSON, the others as YAML).
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
_RECIPE_MAX_BYTES = 16 * 2**20  # far above any recipe; what is longer is some other file


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The recipe file as a dict (YAML, or JSON by suffix); ``ConfigError`` for a missing, empty or malformed file.
    A pipe is read as a file is (``surgery validate <(...)``, ``/dev/stdin``)."""
    path = Path(path)
    if path.is_dir():
        recipes = sorted(p.name for p in path.iterdir() if p.suffix in RECIPE_SUFFIXES)
        named = ", ".join(recipes[:3]) + (", ..." if len(recipes) > 3 else "")
        raise ConfigError(f"{path}: a directory, not a recipe file; give one of its recipes"
                          + (f" ({named})." if recipes else ", a .yaml or .json file."))
    if not path.exists():
        raise ConfigError(f"{path}: no such recipe file.")
    try:
        with path.open("rb") as f:  # a pipe too; at most a cap's worth, for one that never ends (/dev/zero)
            raw = f.read(_RECIPE_MAX_BYTES + 1)
        if len(raw) > _RECIPE_MAX_BYTES:
            raise ConfigError(f"{path}: over {_RECIPE_MAX_BYTES // 2**20} MiB, not a recipe (a recipe is a short YAML "
                              "or JSON text). Was a data file given in its place?")
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is dropped
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is no UTF-8); a recipe is YAML or JSON text. "
                          "Was a stack, model or data file given in its place?") from None
    except OSError as e:
        raise ConfigError(f"{path}: the recipe cannot be read ({e.strerror}).") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_pairs) if path.suffix == ".json" else \
            yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"{path}: not valid {kind} at {_syntax(e)}.") from None
    except ValueError as e:  # a key given twice in a JSON object
        raise ConfigError(f"{path}: not valid JSON: {e}.") from None
    if data is None:
        raise ConfigError(f"{path}: the recipe is empty.")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}.")
    return data


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
