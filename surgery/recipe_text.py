"""A recipe as text: its YAML or JSON file read without trusting it (a key given twice is
refused, ``1e-3`` is a number, at most 16 MiB, a pipe read as a file), and ``--set PATH=VALUE``
overrides parsed as YAML values and applied to the sections (a list entered by index, a
search's dotted parameter names matched whole). Validating what was read is
:mod:`surgery.recipe`'s."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


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
