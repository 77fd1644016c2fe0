"""Image sources and how their pixels become model inputs.

Small sources (digits, Fashion-MNIST, CIFAR) are held as uint8 arrays (N, C, H, W);
ImageFolder (the ImageNet layout) is held as file paths and decoded lazily.
"""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from resmem_ray.errors import ResMemError
from resmem_ray.schema import DataConfig
from resmem_ray.tasks.splits import DatasetInfo, Split, make_splits

# (mean, std) per channel of the [0, 1]-scaled images.
NORMALIZATION = {
    "digits": ((0.305,), (0.376,)),
    "fashion_mnist": ((0.286,), (0.353,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


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


def load_splits(cfg: DataConfig, seed: int) -> tuple[dict[str, Split], DatasetInfo]:
    parts = SOURCES[cfg.name](cfg)
    arrays = isinstance(parts[0], np.ndarray)
    splits, labels = make_splits(parts, cfg, seed, "images" if arrays else "paths")
    in_channels, size = (parts[0].shape[1], parts[0].shape[2]) if arrays else (3, cfg.image_size)
    return splits, DatasetInfo(cfg.name, int(labels.max()) + 1, in_channels, size)


# --- turning uint8 images into model inputs --------------------------------------------

def normalize(images: np.ndarray | torch.Tensor, dataset: str) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 tensor normalised with the dataset's statistics."""
    mean, std = NORMALIZATION[dataset]
    return prepare(images, mean, std)


def prepare(images: np.ndarray | torch.Tensor, mean, std, resize: int | None = None,
            crop: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 model input: the short side resized to `resize`
    (bilinear, antialiased), the centre `crop` square kept, scaled to [0, 1], normalised;
    torchvision's ImageClassification transforms in that order."""
    from torchvision.transforms import functional as TF

    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # Ray Data hands over read-only buffers, which torch warns about
    x = torch.as_tensor(images)
    if resize:
        x = TF.resize(x, [resize], antialias=True)
    if crop:
        x = TF.center_crop(x, [crop])
    x = x.float().div_(255.0)
    # on the batch's device: Ray Train moves batches onto the GPU
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in (mean, std))
    return (x - mean) / std


def request_image(item, number: int, channels: int, size: int) -> np.ndarray:
    """One served example as uint8 (C, H, W): PNG bytes, a base64 PNG string, or an
    array of integers 0..255 (nested lists, (C, H, W), or (H, W) for one channel)."""
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    want = f"the model takes {size}x{size} images with {channels} channel(s)"
    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise ResMemError(f"example {number}: a string that is not base64 (send a base64 PNG or an array)") from None
    if isinstance(item, bytes):
        try:
            image = Image.open(io.BytesIO(item))
        except (UnidentifiedImageError, OSError):
            raise ResMemError(f"example {number}: not a readable image (send PNG bytes)") from None
        if image.size != (size, size):  # checked before decoding: no large image is ever decoded
            raise ResMemError(f"example {number}: a {image.size[0]}x{image.size[1]} image; {want}")
        try:
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"))
        except (OSError, ValueError):
            raise ResMemError(f"example {number}: a truncated or corrupt image") from None
        return np.ascontiguousarray(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))
    if not isinstance(item, list):
        raise ResMemError(f"example {number}: a {type(item).__name__}; send an array of pixel values or a "
                          "base64 PNG string")
    try:
        pixels = np.asarray(item)
    except ValueError:
        pixels = None
    if pixels is None or pixels.dtype.kind not in "iu":
        raise ResMemError(f"example {number}: not an array of integer pixel values (ragged, or not integers)")
    if pixels.ndim == 2 and channels == 1:
        pixels = pixels[None]
    if pixels.shape != (channels, size, size):
        raise ResMemError(f"example {number}: an array of shape {pixels.shape}; {want}, shape "
                          f"({channels}, {size}, {size})")
    if pixels.min() < 0 or pixels.max() > 255:
        raise ResMemError(f"example {number}: pixel values must lie in 0..255, got {pixels.min()}..{pixels.max()}")
    return pixels.astype(np.uint8)


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
