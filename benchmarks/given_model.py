"""Embed rate of a model trained elsewhere against the suite's own: a torchvision
ResNet-18 state dict (model.source=checkpoint, model.name=resnet18) and the suite's
small_cnn, each through the train stage (which takes the given file as it is) and the
embed stage (Ray Data actors) over the same images.

    python benchmarks/given_model.py --limit 20000
    python benchmarks/given_model.py --dataset digits   # without Fashion-MNIST installed

Fashion-MNIST is the Debian package dataset-fashion-mnist (apt-get install
dataset-fashion-mnist, or pass --root to a folder of its IDX files). The weights are
random (the rate does not depend on them), saved as a user would save theirs. The embed
seconds are the embed stage's own (its manifest entry): every split, dataset creation and
actor start-up included. Writes its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

from results import section, write

from resmem_ray.config import load_config
from resmem_ray.pipeline import run_stage
from resmem_ray.schema import ModelConfig
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.image_data import fashion_mnist_root
from resmem_ray.tasks.vision_models import build_model

QUESTION = "How fast does a given torchvision ResNet-18 embed, next to the suite's own small CNN?"


def given_resnet18(path: Path) -> None:
    """A torchvision ResNet-18 for 1-channel images, saved in torchvision's key layout."""
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(net.state_dict(), path)


def embed_rate(overrides: list[str]) -> tuple[int, float, int]:
    """(rows embedded, the embed stage's seconds, embedding dim) of one run."""
    cfg = load_config("jobs/configs/given_resnet18.yaml", tuple(overrides))
    run_stage("train", cfg)
    run_stage("embed", cfg)
    entry = RunDir(cfg.run_dir).manifest()["stages"]["embed"]
    return sum(entry["rows"].values()), entry["seconds"], entry["embedding_dim"]


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "digits"))
    parser.add_argument("--root", help="fashion_mnist: a folder of its IDX files (default: the Debian package's)")
    parser.add_argument("--limit", type=int, help="data.limit: at most this many images of each split (default: all)")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.dataset == "fashion_mnist" and not (args.root or fashion_mnist_root()):
        sys.exit("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist (or pass --root), "
                 "or run with --dataset digits")
    data = [f"data.name={args.dataset}", *([f"data.root={args.root}"] if args.root else []),
            *([f"data.limit={args.limit}"] if args.limit else [])]
    embed = [f"embed.num_actors={args.actors}", f"embed.cpus_per_actor={os.cpu_count() / args.actors}",
             f"embed.batch_size={args.batch}"]
    ray.init(include_dashboard=False, log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory() as d:
        given_resnet18(Path(d) / "resnet18.pt")
        torch.save(build_model(ModelConfig(name="small_cnn", width=8), 1, 10).state_dict(), Path(d) / "small_cnn.pt")
        for title, model in (("torchvision ResNet-18 state dict (model.name=resnet18)", ["model.name=resnet18"]),
                             ("the suite's small_cnn, width 8", ["model.name=small_cnn", "model.width=8"])):
            name = model[0].split("=")[1]
            rows, seconds, dim = embed_rate([*data, *embed, *model, f"model.path={d}/{name}.pt",
                                             f"run_dir={d}/{name}"])
            results.append((title, dim, rows, seconds))
    lines = section("Given model", QUESTION,
                    f"{args.dataset}, {results[0][2]:,} images (train, val and test), {args.actors} Ray Data "
                    f"actor(s) x {os.cpu_count() / args.actors:g} CPUs, batch {args.batch}; random weights. "
                    "Seconds: the embed stage's own, dataset creation and actor start-up included.", "",
                    "| model | embedding dim | images | embed seconds | images/s | vs small_cnn |",
                    "| --- | ---: | ---: | ---: | ---: | ---: |")
    base = results[1][2] / results[1][3]
    lines += [f"| {t} | {dim} | {rows:,} | {s:.1f} | {rows / s:,.0f} | {rows / s / base:.2f}x |"
              for t, dim, rows, s in results]
    write(args.out, lines)


if __name__ == "__main__":
    main()
