"""Embedding + residual extraction throughput: the embed stage's Ray Data actor pool
against a plain single-process PyTorch loop over the same model and the same images.

    python benchmarks/embed.py --model resnet20 --rows 20000

Both produce the same rows (embedding, logits, residual at T) from uint8 Fashion-MNIST
images; the Ray Data time includes building the dataset and starting the actors. The
model's weights are random (throughput does not depend on them), saved as a run's
trained model so the embed stage's own loading path is used. Writes its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from results import section, write

from resmem_ray.config import Config, DataConfig, ModelConfig
from resmem_ray.tasks.image import ImageClassification
from resmem_ray.tasks.image_data import load_splits, normalize
from resmem_ray.tasks.vision_models import build_model
from resmem_ray.store.artifacts import read_model_meta
from resmem_ray.store.rundir import RunDir
from resmem_ray.store.files import file_hashes


QUESTION = "Is Ray Data's embedding pass (an actor pool) as fast as a plain PyTorch loop?"


def make_run(root: Path, cfg: Config, in_channels: int, num_classes: int, size: int) -> RunDir:
    run = RunDir(root)
    model = build_model(cfg.model, in_channels, num_classes)
    run.model.mkdir(parents=True)
    torch.save(model.state_dict(), run.model / "model.pt")
    meta = {"model": cfg.model.__dict__, "dataset": cfg.data.name, "num_classes": num_classes,
            "in_channels": in_channels, "image_size": size, "embedding_dim": model.embedding_dim}
    (run.model / "meta.json").write_text(json.dumps(meta))
    run.mark_done("train", cfg.to_dict(), files=file_hashes(run.model))
    return run


def plain_loop(run: RunDir, images: np.ndarray, labels: np.ndarray, batch: int, dataset: str) -> float:
    from resmem_ray.tasks.image import load_model

    torch.set_num_threads(os.cpu_count())
    t0 = time.perf_counter()
    model, _ = load_model(run)
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            z = model.embed(normalize(images[s:s + batch], dataset))
            model.head(z).numpy()
    return len(images) / (time.perf_counter() - t0)


def ray_data(run: RunDir, cfg: Config, split, actors: int, size: int) -> float:
    cfg.embed.num_actors = actors
    cfg.embed.cpus_per_actor = os.cpu_count() / actors
    t0 = time.perf_counter()
    rows_ds = ImageClassification().embed_rows(cfg, run, split, "train", read_model_meta(run, "embed"))
    rows = sum(len(b["id"]) for b in rows_ds.iter_batches(batch_size=None, batch_format="numpy"))
    assert rows == len(split)
    return rows / (time.perf_counter() - t0)


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args()
    cfg = Config(data=DataConfig(name="fashion_mnist", limit=args.rows),
                 model=ModelConfig(name=args.model, width=args.width))
    cfg.embed.batch_size = args.batch
    split = load_splits(cfg.data, cfg.seed)[0]["train"]
    size = split.images.shape[2]
    ray.init(include_dashboard=False, log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory() as d:
        run = make_run(Path(d) / "run", cfg, 1, 10, size)
        plain = plain_loop(run, split.images, split.labels, args.batch, cfg.data.name)
        results.append(("plain PyTorch loop, 1 process", plain))
        for actors in (1, 2):
            results.append((f"Ray Data, {actors} actor(s)", ray_data(run, cfg, split, actors, size)))
    lines = section("Embed", QUESTION,
                    f"{args.model} (width {args.width}) over {len(split):,} Fashion-MNIST train images, batch "
                    f"{args.batch}; Ray Data time includes dataset creation and actor start-up.", "",
                    "| setup | rows/s | vs plain |", "| --- | ---: | ---: |")
    lines += [f"| {name} | {rps:,.0f} | {rps / plain:.2f}x |" for name, rps in results]
    write(args.out, lines)


if __name__ == "__main__":
    main()
