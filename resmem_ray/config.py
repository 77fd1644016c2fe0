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
import typing
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from resmem_ray.errors import ConfigError, ResMemError
from resmem_ray.schema import (Config, DataConfig, EmbedConfig, EvaluateConfig, IndexConfig,  # noqa: F401
                               ModelConfig, NeighbourTransformerConfig, ResMemConfig, SweepConfig, TextConfig,
                               TrainConfig, TuneConfig)
from resmem_ray.tasks.registry import task_for

CHOICES = {
    "text.tokenizer": ("pretrained", "bpe"),
    "text.lm_embedding": ("final", "last_block_input"),
    "resmem.distance": ("l2", "sqeuclidean", "cosine"),
    "index.backend": ("faiss", "torch"),
    "index.residual_dtype": ("float32", "float16"),
    "tune.search": ("grid", "random", "optuna"),
}
POSITIVE = ("train.epochs", "train.batch_size", "train.num_workers", "embed.batch_size",
            "embed.num_actors", "index.num_shards", "index.replicas", "index.nprobe",
            "index.ef_search", "index.train_sample", "index.cpus_per_shard", "resmem.k", "resmem.sigma",
            "resmem.temperature", "resmem.knn_tau", "evaluate.batch_size", "model.width", "data.imbalance_ratio",
            "neighbour_transformer.k", "neighbour_transformer.d_model", "neighbour_transformer.layers",
            "neighbour_transformer.heads", "neighbour_transformer.epochs", "neighbour_transformer.batch_size",
            "neighbour_transformer.lr", "neighbour_transformer.num_workers",
            "neighbour_transformer.cpus_per_worker", "sweep.reduction_factor", "sweep.max_concurrent",
            "sweep.cpus_per_trial", "text.max_length",
            "text.vocab_size", "text.lm_layers", "text.lm_dim", "text.lm_heads", "text.top_m")

def read_yaml_mapping(path: str, what: str, error: type[ResMemError] = ResMemError) -> dict:
    """A YAML file holding a mapping, or `error` naming `what` and the file."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise error(f"{what} {path} must hold a mapping at the top level")
    return raw


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults), apply `a.b=value` overrides, validate."""
    raw = read_yaml_mapping(path, "config file", ConfigError) if path is not None else {}
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
    cfg = _build(Config, raw, prefix="")
    _check_values(cfg)
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


def _get(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _check_values(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"config key {key}: unknown value {_get(cfg, key)!r} "
                              f"(choose from {', '.join(allowed)})")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"config key {key} must be positive, got {_get(cfg, key)}")
    for frac in ("data.val_fraction", "data.test_fraction"):
        if not 0 <= _get(cfg, frac) < 1:
            raise ConfigError(f"config key {frac} must be in [0, 1), got {_get(cfg, frac)}")
    for key in ("tune.k", "tune.sigma", "tune.temperature", "tune.gate", "tune.gate_threshold", "tune.knn_tau"):
        values = _get(cfg, key)
        if not values or any(v <= 0 for v in values):
            raise ConfigError(f"config key {key} must be a non-empty list of positive values, got {values}")
    if not 0 <= cfg.resmem.knn_lambda <= 1:
        raise ConfigError(f"config key resmem.knn_lambda must be in [0, 1], got {cfg.resmem.knn_lambda}")
    if not cfg.tune.knn_lambda or any(not 0 <= v <= 1 for v in cfg.tune.knn_lambda):
        raise ConfigError(f"config key tune.knn_lambda must be a non-empty list of values in [0, 1], "
                          f"got {cfg.tune.knn_lambda}")
    if cfg.data.imbalance_ratio < 1:
        raise ConfigError(f"config key data.imbalance_ratio must be >= 1 (1: balanced), got {cfg.data.imbalance_ratio}")
    for key in ("tune.gate_softness", "resmem.gate_softness"):
        if any(v < 0 for v in np.atleast_1d(_get(cfg, key))):
            raise ConfigError(f"config key {key} must be >= 0, got {_get(cfg, key)}")
    for key, allowed in (("tune.distance", CHOICES["resmem.distance"]), ("tune.normalize", (True, False))):
        if not _get(cfg, key) or any(v not in allowed for v in _get(cfg, key)):
            raise ConfigError(f"config key {key} must be a non-empty list of {allowed}, got {_get(cfg, key)}")
    if cfg.neighbour_transformer.d_model % cfg.neighbour_transformer.heads:
        raise ConfigError("config key neighbour_transformer.d_model must be a multiple of "
                          "neighbour_transformer.heads")
    for key in ("sweep.width", "sweep.rungs", "sweep.lr"):
        if any(v <= 0 for v in _get(cfg, key)) or (key != "sweep.lr" and not _get(cfg, key)):
            raise ConfigError(f"config key {key} must be a non-empty list of positive values, got {_get(cfg, key)}")
    if cfg.sweep.rungs != sorted(set(cfg.sweep.rungs)):
        raise ConfigError(f"config key sweep.rungs must be increasing epochs, got {cfg.sweep.rungs}")
    if any(k <= 0 for k in cfg.evaluate.knn_ks):
        raise ConfigError(f"config key evaluate.knn_ks must hold positive ints, got {cfg.evaluate.knn_ks}")
    if not 0 <= cfg.text.prob_floor < 1:
        raise ConfigError(f"config key text.prob_floor must be in [0, 1), got {cfg.text.prob_floor}")
