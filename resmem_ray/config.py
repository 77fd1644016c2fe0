"""Typed run configuration: YAML file + dotted overrides -> nested dataclasses.

Every key is checked: an unknown key, a value of the wrong type or a missing required
value raises ConfigError naming the dotted key, so a typo fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from resmem_ray.errors import ResMemError


class ConfigError(ResMemError):
    pass


@dataclass
class DataConfig:
    name: str = "digits"  # digits | fashion_mnist | cifar10 | cifar100 | imagefolder | bbc_news | tweets | hf
    root: Optional[str] = None  # dataset folder (fashion_mnist, cifar*, imagefolder)
    download: bool = False  # torchvision datasets only; machines here have no network
    val_fraction: float = 0.1  # of the source train split, held out of training and memory
    test_fraction: float = 0.2  # only for datasets without an official test split (digits)
    limit: Optional[int] = None  # cap on examples per split, for quick runs
    image_size: int = 224  # imagefolder only: images are resized and centre-cropped to this
    augment: bool = False  # random crop + flip during training (CIFAR / ImageNet recipes)
    imbalance_ratio: float = 1.0  # long tail: >1 subsamples train classes exponentially (CIFAR-LT)


@dataclass
class ModelConfig:
    name: str = "small_cnn"  # small_cnn | resnet20 | resnet32 | resnet56 | resnet18 | resnet50
    # text (see TextConfig): hf_classifier | gpt2_lm
    width: int = 16  # small_cnn: first conv channels; cifar resnets: multiplier of 16


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # per worker
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    num_workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclass
class TextConfig:
    """Text data and models (data.name bbc_news | tweets | hf; model.name hf_classifier | gpt2_lm)."""

    # data.name=hf: a hub name, or a local .parquet / .jsonl / .csv file or save_to_disk dir
    hf_path: Optional[str] = None
    hf_subset: Optional[str] = None  # hub dataset config, e.g. sst2 of glue
    train_split: str = "train"
    test_split: Optional[str] = "test"  # null: carve the test split out of train (data.test_fraction)
    text_column: str = "text"
    label_column: Optional[str] = "label"  # null: unlabelled text (language modelling only)
    max_length: int = 128  # tokens per example; longer texts are truncated
    pretrained: Optional[str] = None  # hf_classifier: model folder or hub name; null: the packaged MiniLM
    freeze_encoder: bool = False  # hf_classifier: train the head (and pooler) only
    tokenizer: str = "pretrained"  # gpt2_lm: pretrained (MiniLM's WordPiece, or text.pretrained's) | bpe (trained)
    vocab_size: int = 2048  # gpt2_lm with tokenizer=bpe: size of the trained byte-level BPE vocabulary
    lm_layers: int = 2  # gpt2_lm: a GPT-2 config trained from scratch
    lm_dim: int = 128
    lm_heads: int = 4
    lm_embedding: str = "final"  # gpt2_lm token embedding: final (hidden state) | last_block_input
    top_m: int = 32  # gpt2_lm sparse residual codec: base-model probabilities kept per memory token
    prob_floor: float = 1e-3  # gpt2_lm: corrected probabilities are clipped below at prob_floor * p(v)


@dataclass
class EmbedConfig:
    batch_size: int = 256
    num_actors: int = 2  # Ray Data actor pool size: one model replica per actor
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0


@dataclass
class IndexConfig:
    num_shards: int = 2
    factory: str = "Flat"  # FAISS factory string: Flat, IVF1024,Flat, IVF1024,PQ16, HNSW32, ...
    train_sample: int = 100_000  # rows sampled per shard to train IVF / PQ indices
    nprobe: int = 16  # IVF: inverted lists visited per query
    ef_search: int = 64  # HNSW: breadth of the search
    backend: str = "faiss"  # faiss | torch (exact: matrix multiply + top-k, GPU when present)
    use_gpu: bool = False  # shard actors ask Ray for a GPU; CPU fallback (logged) without one
    replicas: int = 1  # actors per shard; query batches are balanced across them
    cpus_per_shard: float = 0.5  # CPU share of each shard actor (also its FAISS threads)
    residual_dtype: str = "float32"  # float16 halves the memory's residual rows (ImageNet: 2.6 GB)


@dataclass
class ResMemConfig:
    k: int = 20  # neighbours whose residuals are summed
    sigma: float = 0.5  # kernel temperature: weights = softmax(-d / sigma)
    temperature: float = 1.0  # T in p = softmax(logits / T), used for residuals and prediction
    gate: float = 1.0  # lambda: weight of the memory's correction
    gate_threshold: float = 1.0  # confidence gate: correct only where max p(x) < this (1.0: always)
    gate_softness: float = 0.0  # 0: hard threshold; > 0: sigmoid((threshold - max p) / softness)
    distance: str = "l2"  # l2 | sqeuclidean | cosine
    normalize: bool = True  # L2-normalise embeddings before indexing and search


@dataclass
class TuneConfig:
    """The search space of `resmem tune` (scored on the validation split)."""

    search: str = "grid"  # grid: every combination | random, optuna: num_samples draws from the ranges
    num_samples: int = 100  # random and optuna only
    k: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 30, 50])
    sigma: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    temperature: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    gate: list[float] = field(default_factory=lambda: [0.5, 1.0])
    gate_threshold: list[float] = field(default_factory=lambda: [1.0])  # e.g. [0.8, 0.9, 1.0]
    gate_softness: list[float] = field(default_factory=lambda: [0.0])  # e.g. [0.0, 0.05]
    distance: list[str] = field(default_factory=lambda: ["l2"])  # each distance x normalize pair
    normalize: list[bool] = field(default_factory=lambda: [True])  # is one index build + val search
    learned_gate: bool = True  # fit a logistic gate on val at the best setting (a report row)
    cpus_per_trial: float = 0.25
    evaluate: bool = True  # then rebuild the index at the best setting and evaluate once on test


@dataclass
class NeighbourTransformerConfig:
    """The memorization study's Transformer over a query and its k nearest neighbours."""

    enabled: bool = False  # train it (after index) and report it beside k-NN and ResMem
    k: int = 10
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    epochs: int = 20
    batch_size: int = 128  # per worker
    lr: float = 1e-3
    num_workers: int = 1  # Ray Train workers
    cpus_per_worker: float = 1.0


@dataclass
class SweepConfig:
    """`resmem sweep`: the whole pipeline per base-model setting, ASHA over epochs."""

    width: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    lr: list[float] = field(default_factory=list)  # empty: train.lr
    rungs: list[int] = field(default_factory=lambda: [3, 10])  # epochs at which ASHA may stop a trial
    reduction_factor: int = 2
    tune_resmem: bool = True  # per trial, ResMem's setting is the best of the tune.* grid on val
    max_concurrent: int = 2  # trials at once; each trial's stages ask Ray for their own CPUs
    cpus_per_trial: float = 0.1  # the trial process only drives the stages


@dataclass
class EvaluateConfig:
    knn_ks: list[int] = field(default_factory=lambda: [1, 10, 20, 30])
    batch_size: int = 1024  # queries per lookup round trip


@dataclass
class Config:
    run_dir: str = "runs/digits"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    resmem: ResMemConfig = field(default_factory=ResMemConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    neighbour_transformer: NeighbourTransformerConfig = field(default_factory=NeighbourTransformerConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    text: TextConfig = field(default_factory=TextConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "data.name": ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "bbc_news", "tweets", "hf"),
    "model.name": ("small_cnn", "resnet20", "resnet32", "resnet56", "resnet18", "resnet50",
                   "hf_classifier", "gpt2_lm"),
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
            "resmem.temperature", "evaluate.batch_size", "model.width", "data.imbalance_ratio",
            "neighbour_transformer.k", "neighbour_transformer.d_model", "neighbour_transformer.layers",
            "neighbour_transformer.heads", "neighbour_transformer.epochs", "neighbour_transformer.batch_size",
            "neighbour_transformer.lr", "neighbour_transformer.num_workers",
            "neighbour_transformer.cpus_per_worker", "sweep.reduction_factor", "sweep.max_concurrent",
            "sweep.cpus_per_trial", "text.max_length",
            "text.vocab_size", "text.lm_layers", "text.lm_dim", "text.lm_heads", "text.top_m")
TEXT_DATA = ("bbc_news", "tweets", "hf")
TEXT_MODELS = ("hf_classifier", "gpt2_lm")


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
    for key in ("tune.k", "tune.sigma", "tune.temperature", "tune.gate", "tune.gate_threshold"):
        values = _get(cfg, key)
        if not values or any(v <= 0 for v in values):
            raise ConfigError(f"config key {key} must be a non-empty list of positive values, got {values}")
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
    if cfg.data.name in ("imagefolder",) and not cfg.data.root:
        raise ConfigError("config key data.root is required for data.name=imagefolder")
    if (cfg.data.name in TEXT_DATA) != (cfg.model.name in TEXT_MODELS):
        raise ConfigError(f"config key model.name={cfg.model.name!r} does not fit data.name={cfg.data.name!r}: "
                          f"text data ({', '.join(TEXT_DATA)}) takes a text model ({', '.join(TEXT_MODELS)})")
    if cfg.data.name == "hf" and not cfg.text.hf_path:
        raise ConfigError("config key text.hf_path is required for data.name=hf")
    if cfg.model.name == "hf_classifier" and not cfg.text.label_column:
        raise ConfigError("config key text.label_column is required for model.name=hf_classifier")
    if not 0 <= cfg.text.prob_floor < 1:
        raise ConfigError(f"config key text.prob_floor must be in [0, 1), got {cfg.text.prob_floor}")
