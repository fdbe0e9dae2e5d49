"""Which field a recipe key that is no field meant: a misspelling (``epoch`` for
``epochs``), or a field of the section one level down (``finetune.lr`` is
``finetune.optimizer.lr``). Found by walking the pydantic models' annotations along the
key's path, so every section, op and layer method is covered without a list to keep.
Likewise which of a field's choices a value that is none of them meant (``rmb``: ``rbm``)."""

from __future__ import annotations

import difflib
import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel


def _unwrap(ann: Any) -> list[Any]:
    """The types an annotation may hold: Annotated, Optional and Union taken apart."""
    origin = get_origin(ann)
    if origin is Annotated:
        return _unwrap(get_args(ann)[0])
    if origin in (Union, types.UnionType):
        return [t for a in get_args(ann) for t in _unwrap(a)]
    return [ann]


def _is_model(t: Any) -> bool:
    # not issubclass alone: on Python 3.10 ``dict[str, X]`` passes isinstance(t, type), then
    # issubclass raises TypeError
    return get_origin(t) is None and isinstance(t, type) and issubclass(t, BaseModel)


def _models(ann: Any) -> list[type[BaseModel]]:
    return [t for t in _unwrap(ann) if _is_model(t)]


def _step(ann: Any, key: Any) -> list[Any]:
    """What ``ann`` holds at ``key``: a model's field, a list's item or a mapping's value."""
    held = []
    for t in _unwrap(ann):
        args = get_args(t)
        if _is_model(t) and isinstance(key, str) and key in t.model_fields:
            held.append(t.model_fields[key].annotation)
        elif get_origin(t) in (list, tuple) and isinstance(key, int) and args:
            held.append(args[0])
        elif get_origin(t) is dict and isinstance(key, str) and len(args) == 2:
            held.append(args[1])
    return held


def _fits(model: type[BaseModel], given: dict[str, Any], key: str) -> bool:
    """Whether ``given`` (the mapping the unknown ``key`` sits in) may be a ``model``: every
    other key a field of it, and each of its tags (``op``, ``method``) one it accepts."""
    for k, v in given.items():
        if k == key:
            continue
        if k not in model.model_fields:
            return False
        tag = model.model_fields[k].annotation
        if get_origin(tag) is Literal and v not in get_args(tag):
            return False
    return True


def value_hint(err: dict[str, Any]) -> str:
    """For a pydantic error of a value that is none of a field's choices (a layer's method,
    an op, an optimizer's name): ``; did you mean 'rbm'?`` when one is close, else ``""``."""
    ctx = err.get("ctx") or {}
    choices = ctx.get("expected_tags") if err["type"] == "union_tag_invalid" else (
        ctx.get("expected") if err["type"] == "literal_error" else None)
    given = ctx.get("tag", err.get("input"))
    if not isinstance(choices, str) or not isinstance(given, str):
        return ""
    options = re.findall(r"'([^']*)'", choices)
    by_case = [o for o in options if o.lower() == given.lower()]
    begun = [o for o in options if o.startswith(given.lower())] if given else []  # exp: exponential
    close = by_case or begun[:len(begun) == 1] or difflib.get_close_matches(given, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _may_hold(ann: Any, value: Any) -> bool:
    """Whether a field of type ``ann`` may take ``value`` by its shape: a section (a mapping)
    only a mapping, a plain value only a field that is not a section alone."""
    sections = [t for t in _unwrap(ann) if t is not type(None)]
    if all(_is_model(t) for t in sections):
        return isinstance(value, dict)
    return True


def field_hint(root: type[BaseModel], path: list[Any], data: Any) -> str | None:
    """For the key at ``path`` (e.g. ``["finetune", "lr"]``) that no model there has, given
    the input ``data``: which field was meant, e.g. ``did you mean finetune.epochs?``, ``it
    belongs in finetune.optimizer.lr``, or the fields there are; ``None`` when the path
    leads to no model."""
    *parent, key = path
    anns: list[Any] = [root]
    given = data
    for p in parent:
        anns = [held for a in anns for held in _step(a, p)]
        if isinstance(given, dict):
            given = given.get(p)
        elif isinstance(given, list) and isinstance(p, int) and 0 <= p < len(given):
            given = given[p]
        else:
            given = None
    models = [m for a in anns for m in _models(a)]
    if isinstance(given, dict):  # of a union (an op, a layer's method), the forms it may be
        models = [m for m in models if _fits(m, given, str(key))] or models
    if not models:
        return None
    here = ".".join(map(str, parent))
    at = f"{here}." if here else ""
    fields = sorted({f for m in models for f in m.model_fields})
    close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.75)
    if close:
        return f"no such field; did you mean {at}{close[0]}?"
    value = given.get(key) if isinstance(given, dict) else None
    below = sorted({f"{at}{f}.{key}" for m in models for f, info in m.model_fields.items()
                    for sub in _models(info.annotation)
                    if key in sub.model_fields and _may_hold(sub.model_fields[key].annotation, value)})
    if below:
        return f"no such field here; it belongs in {' or '.join(below)}"
    part = [f for f in fields if f.startswith(f"{key}_") or f.endswith(f"_{key}")][:3]  # a part of a name
    if part:
        return f"no such field; did you mean {' or '.join(at + f for f in part)}?"
    return f"no such field; the fields {'of ' + here if here else 'of a recipe'} are {', '.join(fields)}"
