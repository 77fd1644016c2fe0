"""Loaders on real formats written by the tests: IDX (Fashion-MNIST), torchvision's CIFAR
batches, an ImageFolder of PNGs; and the split rules."""

import gzip
import pickle

import numpy as np
import pytest

from resmem_ray.config import DataConfig
from resmem_ray.tasks.image_data import load_splits, read_idx
from resmem_ray.errors import ResMemError


def check_splits(splits, total):
    ids = [set(splits[s].ids.tolist()) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(len(i) for i in ids) == total


def test_digits_splits_are_deterministic_and_disjoint():
    cfg = DataConfig(name="digits", val_fraction=0.1, test_fraction=0.2)
    a, info = load_splits(cfg, seed=0)
    b, _ = load_splits(cfg, seed=0)
    c, _ = load_splits(cfg, seed=1)
    check_splits(a, 1797)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 8)
    assert len(a["test"]) == 359 and a["train"].images.dtype == np.uint8
    for s in a:
        np.testing.assert_array_equal(a[s].ids, b[s].ids)
        np.testing.assert_array_equal(a[s].images, b[s].images)
    assert not np.array_equal(a["test"].ids, c["test"].ids)
    limited, _ = load_splits(DataConfig(name="digits", limit=40), seed=0)
    assert all(len(s) == 40 for s in limited.values())
    assert set(limited["train"].ids) <= set(a["train"].ids)


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    xtr, ytr = rng.integers(0, 256, (50, 28, 28)), rng.integers(0, 10, 50)
    xte, yte = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 10, 20)
    for name, arr in [("train-images-idx3-ubyte", xtr), ("train-labels-idx1-ubyte", ytr),
                      ("t10k-images-idx3-ubyte", xte), ("t10k-labels-idx1-ubyte", yte)]:
        write_idx(raw / f"{name}.gz", arr)
    np.testing.assert_array_equal(read_idx(raw / "t10k-labels-idx1-ubyte.gz"), yte)
    splits, info = load_splits(DataConfig(name="fashion_mnist", root=str(tmp_path), val_fraction=0.2), 0)
    check_splits(splits, 70)
    assert (info.in_channels, info.image_size) == (1, 28)
    # the official test split is kept whole, with ids after the train ids
    assert splits["test"].ids.tolist() == list(range(50, 70))
    np.testing.assert_array_equal(splits["test"].images[:, 0], xte)
    np.testing.assert_array_equal(splits["test"].labels, yte)


def test_fashion_mnist_missing_files_named(tmp_path):
    with pytest.raises(ResMemError, match="no train-images-idx3-ubyte"):
        load_splits(DataConfig(name="fashion_mnist", root=str(tmp_path)), 0)


def test_idx_rejects_garbage(tmp_path):
    p = tmp_path / "bad-idx"
    p.write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(ResMemError, match="not an unsigned-byte IDX file"):
        read_idx(p)


def write_cifar10(root, n_per_batch=6, n_test=8):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else n_per_batch
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        batches[name] = entry
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return batches


def test_cifar10_torchvision_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    batches = write_cifar10(tmp_path)
    # Our files are real CIFAR batches, but not the released ones: skip only the md5 check.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    splits, info = load_splits(DataConfig(name="cifar10", root=str(tmp_path), val_fraction=0.2), 0)
    check_splits(splits, 38)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 3, 32)
    first = batches["test_batch"]["data"][0].reshape(3, 32, 32)
    np.testing.assert_array_equal(splits["test"].images[0], first)
    assert splits["test"].labels.tolist() == batches["test_batch"]["labels"]


def test_cifar_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(ResMemError, match=f"data.root={tmp_path}: Dataset not found"):
        load_splits(DataConfig(name="cifar10", root=str(tmp_path)), 0)


def write_imagefolder(root, classes=("ant", "bee", "cat"), per_class=(8, 3), size=20):
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub, n in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            (root / sub / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(60 + 70 * c, 20, (size, size + 4, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / sub / name / f"{i}.png")


def test_imagefolder_pngs(tmp_path):
    from resmem_ray.tasks.image_data import decode_images

    write_imagefolder(tmp_path)
    splits, info = load_splits(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16,
                                          val_fraction=0.25), 0)
    check_splits(splits, 33)
    assert (info.num_classes, info.in_channels, info.image_size) == (3, 3, 16)
    assert splits["test"].labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    images = decode_images(splits["test"].paths[:2], 16)
    assert images.shape == (2, 3, 16, 16) and images.dtype == np.uint8


def test_imagefolder_needs_train_and_val(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ResMemError, match="missing val/ folder"):
        load_splits(DataConfig(name="imagefolder", root=str(tmp_path)), 0)
    (tmp_path / "val").mkdir()
    with pytest.raises(ResMemError, match="Couldn't find any class folder in .*train"):
        load_splits(DataConfig(name="imagefolder", root=str(tmp_path)), 0)
