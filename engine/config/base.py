"""Typed config machinery: dataclasses <- YAML + `key.sub=value` overrides.

Every sub-config is a plain dataclass whose fields carry a one-line docstring in `metadata["help"]`
(use `field_(default, "help")`). Loading is strict: an unknown key is an error that names the key,
where it came from and the closest valid name. Each dataclass may define `validate(self, root)`;
`validate_tree` calls them all after loading, so cross-section checks (heads vs TP) live next to the
sub-config they constrain.

Every numeric field declares its allowed range (`field_(..., bounds="[1, inf)")`, interval notation; a
list field's bounds apply to each element). `validate_tree` checks the ranges before any `validate`, so a
value like `optim.lr=nan` or `train.log_interval=0` is refused at load with the range in the message.
NaN is never in a range; +-inf only where the bound says `inf` with a closed bracket (e.g. "[-inf, 0]").
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config value or combination is invalid; the message says what to change."""


def field_(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
           bounds: str | None = None):
    """A dataclass field with a one-line description; numeric fields give their allowed range as `bounds`,
    in interval notation: "[0, 1)", "(0, inf)", "[1, inf)", "[-inf, 0]"."""
    metadata = {"help": help}
    if bounds is not None:
        metadata["bounds"] = Bounds.parse(bounds)
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_END = r"([-+]?(?:inf|[0-9.]+(?:e[-+]?[0-9]+)?))"  # a number or +-inf
_BOUNDS = re.compile(rf"^([\[(])\s*{_END}\s*,\s*{_END}\s*([\])])$")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """An interval of allowed values; `text` is how it was written (shown in errors)."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> "Bounds":
        m = _BOUNDS.match(text.strip())
        if not m:
            raise ValueError(f"bounds {text!r}: write an interval like '[0, 1)' or '(0, inf)'")
        low, high = float(m.group(2)), float(m.group(3))
        if low > high:
            raise ValueError(f"bounds {text!r}: the low end is above the high end")
        return cls(low, high, m.group(1) == "[", m.group(4) == "]", text.strip())

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below


def numeric_kind(tp: Any) -> str | None:
    """'scalar' for int/float (optional or not), 'list' for lists of them, else None."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        kinds = {numeric_kind(a) for a in get_args(tp) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    if origin in (list, tuple):
        args = get_args(tp)
        return "list" if args and numeric_kind(args[0]) == "scalar" else None
    return "scalar" if tp in (int, float) else None


def check_bounds(cfg: Any, where: str = "") -> None:
    """Every numeric field of this dataclass (not its sub-sections) lies in its declared range."""
    for f in dataclasses.fields(cfg):
        bounds: Bounds | None = f.metadata.get("bounds")
        value = getattr(cfg, f.name)
        if bounds is None or value is None or isinstance(value, bool):
            continue
        path = f"{where}.{f.name}" if where else f.name
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, v in items:
            if not bounds.contains(v):
                name = path if i is None else f"{path}[{i}]"
                nan = " (NaN is never allowed)" if isinstance(v, float) and math.isnan(v) else ""
                raise ConfigError(f"{name}={v!r} is outside the allowed range {bounds.text}{nan}: "
                                  f"{f.metadata.get('help', '')}")


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(valid))}."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/override value to the annotated type, or raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be null")
    if origin is typing.Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys are errors."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'.{_suggest(key, list(fields))}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Merge `a.b.c=value` strings (values parsed as YAML scalars/lists) into a nested dict."""
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section")
        node[keys[-1]] = value
    return data


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def validate_tree(cfg: Any, root: Any | None = None, where: str = "") -> None:
    """Check every field's range, then call `validate(root)` on every dataclass in the tree, depth first."""
    root = cfg if root is None else root
    if root is cfg:
        _check_all_bounds(cfg, where)  # before any validate(), so those see values in range
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate_tree(value, root, f"{where}.{f.name}" if where else f.name)
    if hasattr(cfg, "validate"):
        cfg.validate(root)


def _check_all_bounds(cfg: Any, where: str) -> None:
    check_bounds(cfg, where)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_all_bounds(value, f"{where}.{f.name}" if where else f.name)
