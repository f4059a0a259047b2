"""One config system for the whole project: dataclasses + YAML + dotted overrides.

A config is a tree of dataclasses. Values come, in increasing priority, from the
dataclass defaults, a preset (a YAML file shipped under ``labelwise/configs``), a user
YAML file (``--config``) and ``--set dotted.key=value`` overrides. Everything is
validated against the dataclass types and the ``range``/``choices`` metadata of each
field; an unknown key is an error that names the closest valid key. The fully resolved
config is what gets saved to ``RUN_DIR/config.yaml`` and reloaded by ``infer``/resume.

Declaring a field with constraints::

    @dataclass
    class OptimConfig:
        lr: float = param(1e-3, range=(0.0, None), help="peak learning rate")
        schedule: str = param("poly", choices=("poly", "cosine", "constant"))
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, TypeVar

import yaml

from labelwise.errors import LabelwiseError

T = TypeVar("T")

__all__ = [
    "param",
    "from_dict",
    "to_dict",
    "all_keys",
    "parse_overrides",
    "apply_overrides",
    "deep_merge",
    "load_yaml",
    "resolve_config",
    "absolute_paths",
    "save_config",
    "load_config",
]


def param(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
          range: tuple[float | None, float | None] | None = None,
          choices: Iterable[Any] | None = None, path: bool = False, help: str = "") -> Any:
    """A dataclass field with validation metadata (inclusive ``range``, ``choices``) and help text.

    ``path=True`` marks a file or folder path: :func:`resolve_config` stores it absolute
    (relative to the working directory), so a saved config means the same file wherever
    the run is resumed or loaded from.
    """
    meta = {"range": range, "choices": tuple(choices) if choices is not None else None, "help": help,
            "path": path}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --------------------------------------------------------------------------- helpers


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _closest(name: str, candidates: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return match[0] if match else None


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config class (leaves and sections)."""
    keys: list[str] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if _is_dataclass_type(hints[f.name]):
            keys.extend(all_keys(hints[f.name], key + "."))
    return keys


def _unknown_key_error(key: str, cls: type, prefix: str, source: str) -> LabelwiseError:
    """``cls`` is the config section the key was looked up in, ``prefix`` its dotted path. A section
    names the keys it replaced in a ``RENAMED`` class attribute (old leaf -> what replaces it)."""
    replaced = getattr(cls, "RENAMED", {}).get(key.rsplit(".", 1)[-1])
    if replaced:
        return LabelwiseError(f"config key '{key}' in {source} was replaced by {replaced}")
    candidates = all_keys(cls, prefix)
    guess = _closest(key, candidates)
    if guess is None:  # fall back to matching the last component
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in candidates}
        g = _closest(leaf, leaves)
        guess = leaves[g] if g else None
    hint = f"; did you mean '{guess}'?" if guess else ""
    return LabelwiseError(f"unknown config key '{key}' in {source}{hint}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise a one-line error naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: str) -> LabelwiseError:
        return LabelwiseError(f"config key '{key}' in {source} expects {expected}, got {value!r}")

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        # "none"/"null" on the command line means None for every optional field.
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")
                             and type(None) in args):
            if type(None) in args:
                return None
            raise fail(" or ".join(_type_name(a) for a in non_none))
        errors = []
        for a in non_none:
            try:
                return _coerce(value, a, key, source)
            except LabelwiseError as e:
                errors.append(e)
        raise fail(" or ".join(_type_name(a) for a in non_none))
    if origin is Literal:
        if value in args:
            return value
        raise fail(f"one of {list(args)}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise fail(f"a mapping of {_type_name(tp)} fields")
        return _from_dict(tp, value, key + ".", source)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise fail("a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise fail(f"a list of {len(args)} values")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise fail("a mapping")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise fail("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise fail("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise fail("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail(_type_name(tp))


def _check_meta(value: Any, f: dataclasses.Field, key: str, source: str) -> None:
    if value is None:
        return
    choices = f.metadata.get("choices")
    if choices is not None:
        vals = value if isinstance(value, (list, tuple)) else [value]
        for v in vals:
            if v not in choices:
                raise LabelwiseError(f"config key '{key}' in {source} must be one of {list(choices)}, got {v!r}")
    rng = f.metadata.get("range")
    if rng is not None:
        lo, hi = rng
        vals = value if isinstance(value, (list, tuple)) else [value]
        for v in vals:
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
                raise LabelwiseError(f"config key '{key}' in {source} must be in {bounds}, got {v!r}")


def _from_dict(cls: type[T], data: Mapping[str, Any], prefix: str, source: str) -> T:
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise _unknown_key_error(f"{prefix}{k}", cls, prefix, source)
    kwargs = {}
    for name, f in names.items():
        if name not in data:
            continue
        key = f"{prefix}{name}"
        value = _coerce(data[name], hints[name], key, source)
        _check_meta(value, f, key, source)
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without default
        raise LabelwiseError(f"config section '{prefix.rstrip('.') or cls.__name__}' in {source}: {e}") from None
    # Validate defaults too, and run the class's own cross-field checks.
    post = getattr(obj, "validate", None)
    if callable(post):
        post()
    return obj


def from_dict(cls: type[T], data: Mapping[str, Any] | None, source: str = "config") -> T:
    """Build and validate config ``cls`` from a (possibly partial) nested dict."""
    data = data or {}
    if not isinstance(data, Mapping):
        raise LabelwiseError(f"{source} must hold a mapping of config keys, got {type(data).__name__}")
    return _from_dict(cls, data, "", source)


def to_dict(cfg: Any) -> Any:
    """Plain, YAML-serialisable nested dict of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path, what: str = "config file", flag: str = "--config") -> dict[str, Any]:
    """Read a YAML mapping; errors name the file (``what``: "config file", "recipe", ...)."""
    path = Path(path)
    if not path.is_file():
        raise LabelwiseError(f"{what} {path} does not exist; check the path given to {flag}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise LabelwiseError(f"{what} {path} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LabelwiseError(f"{what} {path} must hold a mapping of keys, not a {type(data).__name__}")
    return data


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are read as YAML (``true``, ``3``, ``[1, 2]``)."""
    out = []
    for item in items:
        if "=" not in item:
            raise LabelwiseError(f"--set expects dotted.key=value, got '{item}'")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise LabelwiseError(f"--set expects dotted.key=value, got '{item}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str], cls: type | None = None,
                    source: str = "--set") -> dict[str, Any]:
    """Apply ``--set`` overrides to a nested dict; with ``cls``, unknown keys are errors."""
    out = deep_merge({}, data)
    valid = set(all_keys(cls)) if cls is not None else None
    for key, value in parse_overrides(overrides):
        if valid is not None and key not in valid:
            raise _unknown_key_error(key, cls, "", source)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out


def resolve_config(cls: type[T], *, layers: Iterable[tuple[str, Mapping[str, Any]]] = (),
                   files: Iterable[str | Path] = (), overrides: Iterable[str] = ()) -> T:
    """Resolve ``cls`` from named dict layers (e.g. a preset), YAML files and ``--set`` overrides.

    Each layer is validated on its own first so an error names where the bad key came from.
    """
    merged: dict[str, Any] = {}
    for name, layer in layers:
        from_dict(cls, deep_merge(merged, layer), source=name)
        merged = deep_merge(merged, layer)
    for f in files:
        layer = load_yaml(f)
        from_dict(cls, deep_merge(merged, layer), source=str(f))
        merged = deep_merge(merged, layer)
    merged = apply_overrides(merged, overrides, cls)
    return absolute_paths(from_dict(cls, merged, source="--set"))


def absolute_paths(cfg: Any) -> Any:
    """Make every ``param(path=True)`` value of ``cfg`` (a dataclass tree) absolute, in place."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            absolute_paths(value)
        elif f.metadata.get("path") and value:
            if isinstance(value, (list, tuple)):
                setattr(cfg, f.name, type(value)(str(Path(v).expanduser().resolve()) for v in value))
            else:
                setattr(cfg, f.name, str(Path(value).expanduser().resolve()))
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from labelwise.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config(cls: type[T], path: str | Path) -> T:
    """Reload a config saved by :func:`save_config` (strictly validated)."""
    return from_dict(cls, load_yaml(path), source=str(path))
