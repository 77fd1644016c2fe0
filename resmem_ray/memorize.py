"""`resmem memorize`: add labelled examples to a trained run's memory, no retraining.

The examples (an .npz with `images`, uint8 (N, C, H, W), and `labels`, (N,)) are embedded
by the trained model through the same Ray Data actor pool as the embed stage; their
residuals (label minus the model's softmax at the index's T) go into a new exact shard,
and the index manifest is updated atomically. This is "memorize the rest" in practice:
fix a model's errors by adding data. Rerunning `resmem index` rebuilds the memory from
the train split alone, dropping memorized examples.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from resmem_ray.config import TEXT_MODELS, Config, IndexConfig
from resmem_ray.data import Split
from resmem_ray.embed import embedded_rows
from resmem_ray.errors import ResMemError
from resmem_ray.index import prepare_queries, read_index_manifest, write_shards
from resmem_ray.resmem import residuals
from resmem_ray.rundir import RunDir, sha256, write_json


def read_examples(path: str, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from an .npz, checked against what the trained model takes."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"images", "labels"} - set(z.files)
            if missing:
                raise ResMemError(f"{path}: missing array(s) {', '.join(sorted(missing))} "
                                  "(need images (N, C, H, W) uint8 and labels (N,))")
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError) as e:
        raise ResMemError(f"{path}: not a readable .npz file ({e})") from None
    c, s = meta["in_channels"], meta["image_size"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (c, s, s):
        raise ResMemError(f"{path}: images are {images.dtype} {images.shape}, the model takes uint8 "
                          f"(N, {c}, {s}, {s})")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ResMemError(f"{path}: labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= meta["num_classes"]):
        raise ResMemError(f"{path}: labels must lie in [0, {meta['num_classes']}), "
                          f"got {labels.min()}..{labels.max()}")
    if not len(labels):
        raise ResMemError(f"{path}: holds no examples")
    return images, labels.astype(np.int64)


def memorize(cfg: Config, examples: str) -> dict:
    if cfg.model.name in TEXT_MODELS:
        raise ResMemError(f"resmem memorize takes images; model.name={cfg.model.name} runs cannot add examples yet")
    run = RunDir(cfg.run_dir)
    manifest = read_index_manifest(run, needed_by="memorize")
    meta = json.loads((run.model / "meta.json").read_text())
    images, labels = read_examples(examples, meta)
    ids = manifest["next_id"] + np.arange(len(labels), dtype=np.int64)
    print(f"[memorize] embedding {len(labels)} examples from {examples}", flush=True)
    batches = list(embedded_rows(Split(ids, labels, images), run, cfg, meta["image_size"])
                   .iter_batches(batch_size=None, batch_format="numpy"))
    rows = {c: np.concatenate([b[c] for b in batches]) for c in ("id", "label", "embedding", "logits")}
    order = np.argsort(rows["id"])
    rows = {c: v[order] for c, v in rows.items()}
    emb = prepare_queries(rows["embedding"], manifest["distance"], manifest["normalize"])
    res = residuals(rows["logits"], rows["label"], manifest["temperature"])
    # Added rows form one new exact shard: a few examples cannot train IVF / PQ clusters.
    shard_cfg = IndexConfig(num_shards=1, factory="Flat", residual_dtype=manifest["residual_dtype"])
    with tempfile.TemporaryDirectory(dir=run.index) as tmp:
        added = write_shards(Path(tmp), emb, rows["id"], rows["label"], res, shard_cfg, manifest["distance"],
                             manifest["normalize"], manifest["temperature"],
                             first_shard=max(s["shard"] for s in manifest["shards"]) + 1)
        for entry in added["shards"]:
            for name in entry["files"]:
                os.replace(Path(tmp) / name, run.index / name)
    manifest["shards"] += added["shards"]
    manifest["rows"] += added["rows"]
    manifest["next_id"] = int(ids[-1]) + 1
    manifest.setdefault("memorized", []).append(
        {"source": str(examples), "sha256": sha256(Path(examples)), "rows": added["rows"],
         "first_id": int(ids[0]), "shard": added["shards"][0]["shard"]})
    write_json(run.index / "manifest.json", manifest)  # atomic: the shards are in place first
    run.update_outputs("index")  # the run's manifest vouches for the added shards (and a URI gets them)
    print(f"[memorize] added {added['rows']} rows as shard {added['shards'][0]['shard']} "
          f"(ids {ids[0]}..{ids[-1]}); the memory now holds {manifest['rows']} rows", flush=True)
    return manifest

