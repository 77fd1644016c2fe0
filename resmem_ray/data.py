"""Datasets, deterministic train / val / test splits and stable example ids.

A source yields its official train and test parts; `load_splits` turns them into the
three splits ResMem needs:
  train  the base model's training set and the memory,
  val    held out of both (tuning only),
  test   never used to choose anything.
Example ids are positions in the source (official train first, then official test), so
the same config always gives the same ids.

Small sources (digits, Fashion-MNIST, CIFAR) are held as uint8 arrays (N, C, H, W);
ImageFolder (the ImageNet layout) is held as file paths and decoded lazily.
"""

from __future__ import annotations

import gzip
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from resmem_ray.config import DataConfig, TextConfig
from resmem_ray.errors import ResMemError
from resmem_ray.text_data import TEXT_SOURCES

SPLITS = ("train", "val", "test")

# (mean, std) per channel of the [0, 1]-scaled images.
NORMALIZATION = {
    "digits": ((0.305,), (0.376,)),
    "fashion_mnist": ((0.286,), (0.353,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class Split:
    ids: np.ndarray  # int64, stable across runs
    labels: np.ndarray  # int64
    images: Optional[np.ndarray] = None  # uint8 (N, C, H, W) for in-memory sources
    paths: Optional[list[str]] = None  # image files for imagefolder
    texts: Optional[list[str]] = None  # text sources (text_data.py)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int


# --- sources: (train_images, train_labels, test_images, test_labels) or paths ---------

def _digits(cfg: DataConfig):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * 16, 0, 255).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    return images, d.target.astype(np.int64), None, None


def fashion_mnist_root() -> Optional[str]:
    """Where Debian's dataset-fashion-mnist put its IDX files, if installed."""
    try:
        files = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True,
                               text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    hits = [f for f in files if os.path.basename(f).startswith("train-images-idx3-ubyte")]
    return os.path.dirname(hits[0]) if hits else None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or gzipped), as used by MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ResMemError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ResMemError(f"{path}: header says shape {shape} but holds {body.size} bytes")
    return body.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise ResMemError(f"data.root={root}: no {stem}[.gz] there (nor under FashionMNIST/raw)")


def _fashion_mnist(cfg: DataConfig):
    root = cfg.root or fashion_mnist_root()
    if root is None:
        raise ResMemError("data.root is not set and the Debian package dataset-fashion-mnist "
                          "is not installed (apt-get install dataset-fashion-mnist)")
    root = Path(root)
    parts = [read_idx(_find_idx(root, f"{p}-{kind}-idx{n}-ubyte"))
             for p in ("train", "t10k") for kind, n in (("images", 3), ("labels", 1))]
    xtr, ytr, xte, yte = parts
    return xtr[:, None], ytr.astype(np.int64), xte[:, None], yte.astype(np.int64)


def _cifar(cfg: DataConfig):
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if cfg.name == "cifar10" else CIFAR100
    if not cfg.root:
        raise ResMemError(f"config key data.root is required for data.name={cfg.name}")
    try:
        parts = [cls(cfg.root, train=t, download=cfg.download) for t in (True, False)]
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted..."
        raise ResMemError(f"data.root={cfg.root}: {e}") from None
    out = []
    for p in parts:
        out += [np.ascontiguousarray(p.data.transpose(0, 3, 1, 2)), np.asarray(p.targets, np.int64)]
    return tuple(out)


def _imagefolder(cfg: DataConfig):
    """ImageNet layout: root/train/<class>/*.JPEG and root/val/<class>/*.JPEG."""
    from torchvision.datasets import ImageFolder

    for sub in ("train", "val"):
        if not (Path(cfg.root) / sub).is_dir():
            raise ResMemError(f"data.root={cfg.root}: missing {sub}/ folder (ImageNet layout)")
    parts = []
    for sub in ("train", "val"):
        try:
            parts.append(ImageFolder(str(Path(cfg.root) / sub)))
        except FileNotFoundError as e:  # no class folders, or no images in them
            raise ResMemError(f"data.root={cfg.root}: {e}") from None
    if parts[0].classes != parts[1].classes:
        raise ResMemError(f"data.root={cfg.root}: train/ and val/ hold different class folders")
    out = []
    for ds in parts:
        out += [[p for p, _ in ds.samples], np.asarray(ds.targets, np.int64)]
    return tuple(out)


SOURCES = {"digits": _digits, "fashion_mnist": _fashion_mnist, "cifar10": _cifar,
           "cifar100": _cifar, "imagefolder": _imagefolder}


def load_splits(cfg: DataConfig, seed: int, text: Optional[TextConfig] = None
                ) -> tuple[dict[str, Split], DatasetInfo]:
    if cfg.name in TEXT_SOURCES:
        xtr, ytr, xte, yte = TEXT_SOURCES[cfg.name](text or TextConfig())
    elif cfg.name in SOURCES:
        xtr, ytr, xte, yte = SOURCES[cfg.name](cfg)
    else:
        raise ResMemError(f"unknown dataset data.name={cfg.name!r} (known: {', '.join([*SOURCES, *TEXT_SOURCES])})")
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
        if isinstance(pool_x, np.ndarray):
            splits[name] = Split(ids=idx.astype(np.int64), labels=pool_y[idx], images=pool_x[idx])
        elif cfg.name in TEXT_SOURCES:
            splits[name] = Split(ids=idx.astype(np.int64), labels=pool_y[idx], texts=[pool_x[i] for i in idx])
        else:
            splits[name] = Split(ids=idx.astype(np.int64), labels=pool_y[idx],
                                 paths=[pool_x[i] for i in idx])
    num_classes = int(pool_y.max()) + 1
    if cfg.name in TEXT_SOURCES:
        in_channels, size = 0, 0
    elif isinstance(pool_x, np.ndarray):
        in_channels, size = pool_x.shape[1], pool_x.shape[2]
    else:
        in_channels, size = 3, cfg.image_size
    return splits, DatasetInfo(cfg.name, num_classes, in_channels, size)


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


# --- turning uint8 images into model inputs --------------------------------------------

def normalize(images: np.ndarray | torch.Tensor, dataset: str) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 normalised tensor."""
    x = torch.as_tensor(images).float().div_(255.0)
    mean, std = NORMALIZATION[dataset]
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return (x - mean) / std


def decode_images(paths: list[str], size: int) -> np.ndarray:
    """Read image files into uint8 (N, 3, size, size): resize the short side, centre-crop."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            img = TF.center_crop(TF.resize(img.convert("RGB"), int(size * 256 / 224)), size)
            out[i] = np.asarray(img).transpose(2, 0, 1)
    return out


class SplitDataset(torch.utils.data.Dataset):
    """A split as a torch Dataset of (uint8 image (C, H, W), label, id); decoding is lazy
    for file-backed splits. Normalisation happens per batch in the training loop."""

    def __init__(self, split: Split, image_size: int):
        self.split, self.image_size = split, image_size

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        s = self.split
        image = s.images[i] if s.images is not None else decode_images([s.paths[i]], self.image_size)[0]
        return torch.from_numpy(np.ascontiguousarray(image)), int(s.labels[i]), int(s.ids[i])


def augment_batch(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop with padding and horizontal flip, per example (CIFAR recipe)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n))
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n) < 0.5
    out[flip] = out[flip].flip(-1)
    return out
