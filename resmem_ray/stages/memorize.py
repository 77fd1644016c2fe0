"""`resmem memorize`: add labelled examples to a trained run's memory, no retraining.

The task reads the examples (an image task: an .npz with `images`, uint8 (N, C, H, W),
and `labels`, (N,)); the trained model embeds them through the same Ray Data actor pool
as the embed stage; their residuals (at the index's T) go into a new exact shard, and
the index manifest is updated atomically. This is "memorize the rest" in practice: fix
a model's errors by adding data. The stages that read the memory become stale.
Rerunning `resmem index` rebuilds the memory from the train split alone.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from resmem_ray.core.knn import prepare_queries
from resmem_ray.runtime.shards import write_shards
from resmem_ray.schema import Config, IndexConfig
from resmem_ray.store.artifacts import read_model_meta, read_index_manifest
from resmem_ray.store.files import sha256, write_json
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.registry import task_for


def memorize(cfg: Config, examples: str) -> dict:
    task = task_for(cfg)
    run = RunDir(cfg.run_dir)
    manifest = read_index_manifest(run, needed_by="memorize")
    meta = read_model_meta(run, needed_by="memorize")
    split = task.read_examples(examples, meta)
    split.ids = manifest["next_id"] + np.arange(len(split), dtype=np.int64)
    ids = split.ids
    print(f"[memorize] embedding {len(split)} examples from {examples}", flush=True)
    batches = list(task.embed_rows(cfg, run, split, "memorize", meta).iter_batches(batch_size=None,
                                                                                   batch_format="numpy"))
    rows = {c: np.concatenate([b[c] for b in batches]) for c in task.memory_columns}
    order = np.argsort(rows["id"])
    rows = {c: v[order] for c, v in rows.items()}
    emb = prepare_queries(rows["embedding"], manifest["distance"], manifest["normalize"])
    memory = task.memory_rows(cfg, rows, manifest["temperature"], run.stage_output("embed", "memorize"))
    # Added rows form one new exact shard: a few examples cannot train IVF / PQ clusters.
    shard_cfg = IndexConfig(num_shards=1, factory="Flat", residual_dtype=manifest["residual_dtype"])
    with tempfile.TemporaryDirectory(dir=run.index) as tmp:
        added = write_shards(Path(tmp), emb, rows["id"], rows["label"], memory["residuals"], shard_cfg,
                             manifest["distance"], manifest["normalize"], manifest["temperature"],
                             first_shard=max(s["shard"] for s in manifest["shards"]) + 1,
                             residual_ids=memory.get("residual_ids"))
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

