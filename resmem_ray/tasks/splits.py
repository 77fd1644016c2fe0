"""Deterministic train / val / test splits and stable example ids, for every task.

A source yields its official train and test parts; `make_splits` turns them into the
three splits ResMem needs:
  train  the base model's training set and the memory,
  val    held out of both (tuning only),
  test   never used to choose anything.
Example ids are positions in the source (official train first, then official test), so
the same config always gives the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from resmem_ray.schema import DataConfig

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    ids: np.ndarray  # int64, stable across runs
    labels: np.ndarray  # int64 classes (float targets for regression)
    images: Optional[np.ndarray] = None  # uint8 (N, C, H, W) for in-memory sources
    paths: Optional[list[str]] = None  # image files for imagefolder
    texts: Optional[list[str]] = None  # text sources (text_data.py)
    features: Optional[np.ndarray] = None  # float (N, D) rows (regression)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int


def make_splits(parts: tuple, cfg: DataConfig, seed: int, kind: str) -> tuple[dict[str, "Split"], np.ndarray]:
    """Splits of a source's (train_x, train_y, test_x, test_y) (test parts None: carve test
    out of train); `kind` names the Split field x fills: images (uint8 (N, C, H, W)),
    paths (image files), texts or features (float (N, D)). Returns the splits and the
    pooled labels."""
    xtr, ytr, xte, yte = parts
    rng = np.random.default_rng(seed)
    n_train = len(ytr)
    if yte is None:  # no official test split: carve one out, deterministically
        order = rng.permutation(n_train)
        n_test = int(round(cfg.test_fraction * n_train))
        test_idx, train_idx = np.sort(order[:n_test]), order[n_test:]
        pool_x, pool_y = xtr, ytr
    else:
        train_idx = rng.permutation(n_train)
        test_idx = n_train + np.arange(len(yte))
        pool_x = np.concatenate([xtr, xte]) if isinstance(xtr, np.ndarray) else list(xtr) + list(xte)
        pool_y = np.concatenate([ytr, yte])
    n_val = int(round(cfg.val_fraction * len(train_idx)))
    index = {"train": np.sort(train_idx[n_val:]), "val": np.sort(train_idx[:n_val]), "test": test_idx}
    if cfg.limit is not None:  # a random but fixed subset of each split
        index = {k: np.sort(rng.permutation(v)[: cfg.limit]) for k, v in index.items()}
    if cfg.imbalance_ratio > 1:  # val and test stay balanced, as in CIFAR-LT
        index["train"] = long_tail(index["train"], pool_y, cfg.imbalance_ratio, rng)
    splits = {}
    for name, idx in index.items():
        x = pool_x[idx] if isinstance(pool_x, np.ndarray) else [pool_x[i] for i in idx]
        splits[name] = Split(ids=idx.astype(np.int64), labels=pool_y[idx], **{kind: x})
    return splits, pool_y


def long_tail(idx: np.ndarray, labels: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Subsample classes exponentially (CIFAR-LT): class c keeps n_max * ratio^(-c / (C - 1))
    of its examples, so class 0 keeps all and the last class 1 / ratio of them."""
    classes = np.unique(labels[idx])
    n_max = max(int((labels[idx] == c).sum()) for c in classes)
    keep = []
    for rank, c in enumerate(classes):
        mine = idx[labels[idx] == c]
        n_keep = max(1, int(n_max * ratio ** (-rank / max(len(classes) - 1, 1))))
        keep.append(rng.permutation(mine)[:n_keep])
    return np.sort(np.concatenate(keep))
