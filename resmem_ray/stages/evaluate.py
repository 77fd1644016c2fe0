"""Stage evaluate: answer the test split from the sharded memory (shard actors, parallel
fan-out, global top-k merge) and let the task score every method and write the report
(RUN/report/: metrics.json, report.md, and the task's tables and plots).

The test split streams through in chunks of at most evaluate.chunk_mb: each chunk is
read, searched and handed to the task's scorer (Task.scorer), which keeps running
metrics and a few numbers per test row, and writes per-row results as they come; the
driver never holds the split's embeddings, logits or neighbours whole."""

from __future__ import annotations

import time

from resmem_ray.core.knn import prepare_queries
from resmem_ray.errors import ResMemError
from resmem_ray.log import Progress, stage_log
from resmem_ray.runtime.shards import ShardedMemory
from resmem_ray.schema import Config
from resmem_ray.store.artifacts import (check_codec, check_k, read_first_row, read_index_manifest, split_chunks,
                                        split_row_groups)
from resmem_ray.store.files import atomic_dir, read_json, verify_hashes, write_json
from resmem_ray.store.rundir import RunDir, StageSteps, stage_entry
from resmem_ray.tasks.registry import task_for

log = stage_log("evaluate")


def check_matches_index(cfg: Config, manifest: dict) -> None:
    """The query-time settings must be those the index was built with."""
    for key in ("distance", "normalize", "temperature"):
        if getattr(cfg.resmem, key) != manifest[key]:
            raise ResMemError(f"config key resmem.{key}={getattr(cfg.resmem, key)!r} differs from "
                              f"the index's {manifest[key]!r}: rerun `resmem index`")


def stored_tuning(run: RunDir, cfg: Config) -> dict | None:
    """`resmem tune`'s summary (checked against the manifest) when this config evaluates
    its chosen setting."""
    entry = run.manifest()["stages"].get("tune", {})
    path = run.root / "tune" / "best.json"
    if entry.get("status") != "done" or not path.is_file():
        return None
    verify_hashes(path.parent, {"best.json": entry["outputs"].get("best.json", "")}, "tune summary")
    summary = read_json(path)
    same = all(getattr(cfg.resmem, key) == value for key, value in summary["best"].items())
    return summary if same else None


@stage_entry("evaluate")
def evaluate(cfg: Config, tuning: dict | None = None) -> StageSteps:
    task = task_for(cfg)
    run = RunDir(cfg.run_dir)
    manifest = read_index_manifest(run, needed_by="evaluate")
    check_codec(run, manifest, task.codec, task.name)
    check_matches_index(cfg, manifest)
    tuning = tuning or stored_tuning(run, cfg)
    if cfg.neighbour_transformer.enabled:
        run.stage_output("transformer", needed_by="evaluate (neighbour_transformer.enabled)")
    groups = split_row_groups(run, "test", "evaluate", task.query_columns)
    rows = sum(g["rows"] for g in groups)
    if not rows:
        raise ResMemError(f"{run.embeddings / 'test'} holds no rows: rerun `resmem embed`")
    dim = read_first_row(run.root, next(g for g in groups if g["rows"]), ("embedding",))["embedding"].shape[1]
    if dim != manifest["dim"]:
        raise ResMemError(f"embedding dimension {dim} of {run.embeddings / 'test'} does not match the index in "
                          f"{run.index} ({manifest['dim']} dims): rerun `resmem index`")
    chunks = split_chunks(run.root, groups, task.query_columns, int(cfg.evaluate.chunk_mb * 2**20))
    k = task.lookup_k(cfg)
    check_k(k, manifest["rows"], "max of resmem.k, resmem.knn_k, evaluate.knn_ks and neighbour_transformer.k")
    log.info(f"{rows} test rows against {manifest['rows']} memory rows in {len(manifest['shards'])} shard(s), k={k}, "
             f"in chunks of at most {cfg.evaluate.chunk_mb} MiB")
    with ShardedMemory(run.index, manifest, cfg.index) as memory:  # the shards are checked as they load
        yield run  # once the shards are loaded and checked
        log.info(f"shard actors search on: {', '.join(sorted(set(memory.placement)))}")
        with atomic_dir(run.report) as tmp:
            scorer = task.scorer(cfg, run, manifest, tmp, tuning)
            done, searched, t0, progress = 0, 0, time.time(), Progress(log)
            for test in chunks:  # each chunk searched, scored and dropped
                queries = prepare_queries(test["embedding"], cfg.resmem.distance, cfg.resmem.normalize)
                reads = task.memory_reads(cfg, test)  # a confidence gate: the other rows never read the memory
                asked = queries if reads is None else queries[reads]
                nb = memory.search_batches(asked, k, cfg.evaluate.batch_size, progress=False)
                scorer.add(test, queries, nb, reads)
                searched, done = searched + len(asked), done + len(queries)
                progress(f"{done}/{rows} test rows scored, {searched} searched "
                         f"({searched / max(time.time() - t0, 1e-9):.0f} queries/s)", last=done == rows)
            metrics = scorer.finish()
            write_json(tmp / "metrics.json", metrics)
    return metrics, task.done_info(metrics)
