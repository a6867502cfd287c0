"""Configs from YAML recipes and ``key=value`` overrides, and back to YAML.

``load_config(recipe, overrides)``: the defaults of :mod:`fastclr.config.schema` ← the recipe ← the overrides
(``optim.base_lr=0.5``, ``data.augment.crop_area=[0.2,1.0]``), coerced to the annotated types and validated. A recipe
is a YAML path or the name of a recipe shipped with fastclr (``fastclr/recipes/<name>.yaml``). ``save_config`` writes
the resolved tree as a recipe that loads back to the same config.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import os
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from .schema import Config, ConfigError

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
"""The recipes shipped with the package (``launchers/configs`` in a checkout points here)."""
DEFAULT_RECIPE = "default"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """``value`` (from YAML or the command line) as the annotated type ``typ``, or a ConfigError naming ``name``."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}': expected a mapping, got {value!r}")
        return from_dict(typ, value, name + ".")
    if get_origin(typ) is Literal:  # a choice: validated with its own message by the section's __post_init__
        return str(value).lower() if isinstance(value, bool) else str(value)  # YAML reads true/false as booleans
    try:
        if typ is bool:
            low = str(value).lower()
            if isinstance(value, bool) or low in _TRUE + _FALSE:
                return value if isinstance(value, bool) else low in _TRUE
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if typ in (float, str):
            return typ(value)
        if get_origin(typ) is tuple:
            if isinstance(value, str):
                value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
            if len(value) != len(get_args(typ)):
                raise ValueError(value)
            return tuple(_coerce(v, t, name) for v, t in zip(value, get_args(typ)))
    except (TypeError, ValueError):
        raise ConfigError(f"config field '{name}': cannot read {value!r} as {getattr(typ, '__name__', typ)}") from None
    return value


def from_dict(cls, d: dict, prefix: str = ""):
    """The dataclass ``cls`` from a (partial) nested dict; unknown keys fail naming the field."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"config field '{prefix}{unknown[0]}': unknown; valid fields here: {sorted(names)}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in d.items()})


def to_dict(cfg) -> dict:
    """Plain nested dict (YAML-serialisable: tuples become lists)."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x
    return plain(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.field=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def recipe_path(recipe: str) -> str:
    """A recipe file: ``recipe`` itself if it is a file, else the shipped recipe of that name."""
    if os.path.isfile(recipe):
        return recipe
    shipped = os.path.join(RECIPES_DIR, os.path.basename(recipe) if recipe.endswith(".yaml") else recipe + ".yaml")
    if os.path.isfile(shipped) and os.sep not in recipe:
        return shipped
    raise ConfigError(f"config file '{recipe}' does not exist (shipped recipes: {', '.join(shipped_recipes())})")


def shipped_recipes() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml"))


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None) -> Config:
    """Defaults ← ``base`` (a saved tree: a checkpoint's config) ← YAML recipe (a path or a shipped recipe's name) ←
    ``key=value`` overrides; validated."""
    raw: dict = copy.deepcopy(base) if base else {}
    if path:
        path = recipe_path(path)
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
        if not isinstance(recipe, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
        _merge(raw, recipe)
    for item in overrides:
        key, value = parse_override(item)
        node = raw
        for k in key.split(".")[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config field '{key}': '{k}' is not a section")
        node[key.split(".")[-1]] = value
    return from_dict(Config, raw)


def _merge(into: dict, new: dict) -> None:
    """``new``'s values over ``into``'s, section by section (a recipe sets some fields of a section, not all)."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)


def dump_config(cfg: Config, header: str = "") -> str:
    """The whole tree as a YAML recipe (every field, in schema order) that ``load_config`` reads back equal."""
    lines = "".join(f"# {line}\n" for line in header.splitlines())
    return lines + yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str, header: str = "") -> str:
    from ..atomic import write_text

    write_text(path, dump_config(cfg, header))
    return path


def field_docs(cls) -> dict[str, str]:
    """{field: docstring} of a config dataclass, read from the string literal under each field in the source."""
    tree = ast.parse(inspect.getsource(cls)).body[0]
    docs, body = {}, tree.body
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls=Config, prefix: str = "") -> list[str]:
    """One line per field, ``section.field = default  doc``, sections in order (for ``fastclr pretrain --fields``)."""
    out, docs, hints = [], field_docs(cls), get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += [f"[{prefix}{f.name}]"] + describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            shown = list(value) if isinstance(value, tuple) else value
            out.append(f"  {prefix}{f.name} = {shown!r}" + (f"  — {docs[f.name]}" if f.name in docs else ""))
    return out
