"""Stage embed: every split's rows through the trained model with Ray Data (an actor
pool, one model replica per actor; runtime/embedding.py). The task decides what a row
holds: an example's (id, label, embedding, logits), or one row per token for a language
model. Each split is written atomically as parquet under RUN/embeddings/<split>/.
Residuals are not stored here: `index` computes them, so T changes the memory only."""

from __future__ import annotations


from resmem_ray.errors import ResMemError
from resmem_ray.log import stage_log
from resmem_ray.schema import Config
from resmem_ray.store.artifacts import read_model_meta, write_split
from resmem_ray.store.rundir import RunDir, StageSteps, stage_entry
from resmem_ray.tasks.registry import task_for
from resmem_ray.tasks.splits import SPLITS

log = stage_log("embed")


@stage_entry("embed")
def embed(cfg: Config) -> StageSteps:
    task = task_for(cfg)
    run = RunDir(cfg.run_dir)
    meta = read_model_meta(run, needed_by="embed")
    splits, _ = task.load_splits(cfg)
    yield run  # the entry opens: running
    e = cfg.embed
    counts = {}
    for name in SPLITS:
        split = splits[name]
        if len(split) == 0:
            raise ResMemError(f"split '{name}' is empty: check data.limit / data.val_fraction")
        log.info(f"{name}: {len(split)} examples on {e.num_actors} actor(s)")
        rows = write_split(task.embed_rows(cfg, run, split, name, meta), run, name, e.batch_size)
        if task.one_row_per_example and rows != len(split):
            raise ResMemError(f"embed wrote {rows} rows for split '{name}', expected {len(split)}")
        if not task.one_row_per_example:
            log.info(f"{name}: {rows} rows")
        counts[name] = rows
    return counts, {"rows": counts, "embedding_dim": meta["embedding_dim"], "num_classes": meta["num_classes"],
                    **task.embed_info(cfg, splits, meta)}

