"""Loading a run configuration: YAML file + dotted overrides -> the typed Config of schema.py.

Every key is checked: an unknown key, a value of the wrong type or a missing required
value raises ConfigError naming the dotted key, so a typo fails before any work starts.
The task that model.name picks (tasks/registry.py) checks data.name and its own keys.

Why not OmegaConf's structured configs: they coerce what this loader refuses (`use_gpu:
1` becomes true, `epochs: "3"` becomes 3) and their errors span several lines; one
line that names the key is what users of this suite rely on. The schema stays plain
dataclasses, so moving to OmegaConf later is a change of this file alone.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from resmem_ray.errors import ConfigError, ResMemError
from resmem_ray.schema import (Config, DataConfig, EmbedConfig, EvaluateConfig, IndexConfig,  # noqa: F401
                               ModelConfig, NeighbourTransformerConfig, ResMemConfig, ServeConfig, SweepConfig,
                               TextConfig, TrainConfig, TuneConfig, RULES, get_key)
from resmem_ray.tasks.registry import task_for

# Derived from the rules on the schema's fields (schema.py): the values a key (each element
# of a list) may take; the interval each number lies in ("(0, inf)": positive); the lists
# that must not be empty. NaN and infinities are refused everywhere: a NaN sigma is not a setting.
CHOICES = {key: r.choices for key, r in RULES.items() if r.choices}
RANGES = {key: r.range for key, r in RULES.items() if r.range}
NON_EMPTY = tuple(key for key, r in RULES.items() if r.non_empty)


def _in_range(value: float, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    return math.isfinite(value) and above and below


def read_yaml_mapping(path: str, what: str, error: type[ResMemError] = ResMemError) -> dict:
    """A YAML file holding a mapping, or `error` naming `what` and the file, in one line."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{what} {path} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{what} {path} cannot be read: {e}") from None
    if not isinstance(raw, dict):
        raise error(f"{what} {path} must hold a mapping at the top level")
    return raw


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults), apply `a.b=value` overrides, validate."""
    raw = read_yaml_mapping(path, "config file", ConfigError) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: dict, overrides: tuple[str, ...]) -> dict:
    """`raw` (changed in place) with each `a.b=value` override set in it."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return raw


def config_from_dict(raw: dict) -> Config:
    """A checked Config from a nested mapping (a YAML file's, or a run manifest's)."""
    cfg = _build(Config, raw, prefix="")
    _check_values(cfg)
    if cfg.model.source != "trained" and not cfg.model.path:
        raise ConfigError(f"config key model.path is required for model.source={cfg.model.source}")
    task_for(cfg).check_config(cfg)
    return cfg


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}{key} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        kwargs[f.name] = _coerce(hints[f.name], raw[f.name], prefix + f.name)
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(inner, value, key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key} must be a list, got {value!r}")
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 5e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key} must be {tp.__name__}, got {value!r}")
    return value


def _check_values(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = get_key(cfg, key)
        for v in value if isinstance(value, list) else [value]:
            if v not in allowed:
                raise ConfigError(f"config key {key}: unknown value {v!r} (choose from {', '.join(allowed)})")
    for key in NON_EMPTY:
        if not get_key(cfg, key):
            raise ConfigError(f"config key {key} must be a non-empty list, got []")
    for key, interval in RANGES.items():
        value = get_key(cfg, key)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not _in_range(v, interval):
                word = "positive" if interval == "(0, inf)" else f"in {interval}"
                raise ConfigError(f"config key {key} must be {word}, got {v}")
    if cfg.neighbour_transformer.d_model % cfg.neighbour_transformer.heads:
        raise ConfigError("config key neighbour_transformer.d_model must be a multiple of "
                          "neighbour_transformer.heads")
    if cfg.sweep.rungs != sorted(set(cfg.sweep.rungs)):
        raise ConfigError(f"config key sweep.rungs must be increasing epochs, got {cfg.sweep.rungs}")

