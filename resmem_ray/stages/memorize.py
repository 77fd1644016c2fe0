"""`resmem memorize`: add labelled examples to a trained run's memory, no retraining.

The task reads the examples (an image task: an .npz with `images`, uint8 (N, C, H, W),
and `labels`, (N,)); the trained model embeds them through the same Ray Data actor pool
as the embed stage; their residuals (at the index's T) go into a new exact shard, and
the index manifest is updated atomically (runtime/shards.py: add_shard; `resmem serve`'s
POST /memorize adds rows the same way). This is "memorize the rest" in practice: fix
a model's errors by adding data. The stages that read the memory become stale.
The rows' embedding rows are kept beside the shards (index/memorized/), so rerunning
`resmem index` rebuilds the memory from the train split and them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from resmem_ray.core.knn import prepare_queries
from resmem_ray.log import stage_log
from resmem_ray.runtime.shards import add_shard
from resmem_ray.schema import Config
from resmem_ray.store.artifacts import read_model_meta, read_index_manifest
from resmem_ray.store.files import sha256
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.registry import task_for

log = stage_log("memorize")


def memorize(cfg: Config, examples: str) -> dict:
    task = task_for(cfg)
    run = RunDir(cfg.run_dir)
    manifest = read_index_manifest(run, needed_by="memorize")
    meta = read_model_meta(run, needed_by="memorize")
    split = task.read_examples(examples, meta)
    split.ids = manifest["next_id"] + np.arange(len(split), dtype=np.int64)
    ids = split.ids
    log.info(f"embedding {len(split)} examples from {examples}")
    batches = list(task.embed_rows(cfg, run, split, "memorize", meta).iter_batches(batch_size=None,
                                                                                   batch_format="numpy"))
    rows = {c: np.concatenate([b[c] for b in batches]) for c in task.memory_columns}
    order = np.argsort(rows["id"])
    rows = {c: v[order] for c, v in rows.items()}
    emb = prepare_queries(rows["embedding"], manifest["distance"], manifest["normalize"])
    memory = task.memory_rows(cfg, rows, manifest["temperature"], run.stage_output("embed", "memorize"))
    record = {"source": str(examples), "sha256": sha256(Path(examples)), "rows": len(ids), "first_id": int(ids[0])}
    manifest, _ = add_shard(run, manifest, emb, rows["id"], rows["label"], memory["residuals"], record, rows,
                            memory.get("residual_ids"))
    shard = manifest["shards"][-1]["shard"]
    log.info(f"added {len(ids)} rows as shard {shard} "
             f"(ids {ids[0]}..{ids[-1]}); the memory now holds {manifest['rows']} rows")
    return manifest

