"""Stage index: the memory (train split, and the rows memorize added) as S FAISS shards,
one Ray task per shard.

    RUN/index/manifest.json        dim, metric, shards with row counts and file hashes
    RUN/index/shard-NNNNN.faiss    FAISS's own format
    RUN/index/shard-NNNNN.npz      ids, labels, residual rows (no pickle)
    RUN/index/memorized/*.parquet  embedding rows of memorized examples, carried over

The driver never reads the memory's rows: it checks the split's files against the embed
manifest (names, hashes, row counts from parquet metadata) and plans contiguous shards
as pieces of row groups (store/artifacts.py: plan_shards); each shard's task reads its
own rows and turns them into residual rows (dense: computed there from the stored
logits at resmem.temperature, so the memory always matches the T it is queried with).
"""

from __future__ import annotations

import functools
import shutil

from resmem_ray.core.knn import check_index_config
from resmem_ray.errors import ResMemError
from resmem_ray.log import stage_log
from resmem_ray.runtime.shards import build_planned_shards
from resmem_ray.schema import Config
from resmem_ray.store.artifacts import (footprint_line, load_index_manifest, memorized_row_groups, memory_footprint,
                                        model_fingerprint, plan_shards, read_first_row, split_row_groups)
from resmem_ray.store.files import atomic_dir, inside, write_json
from resmem_ray.store.rundir import RunDir, StageSteps, stage_entry
from resmem_ray.tasks.registry import task_for

log = stage_log("index")


@stage_entry("index")
def build_index(cfg: Config) -> StageSteps:
    task, r = task_for(cfg), cfg.resmem
    columns = task.memory_columns
    run = RunDir(cfg.run_dir)
    embedded = run.stage_output("embed", needed_by="index")
    groups = split_row_groups(run, "train", "index", columns)
    kept = memorized_records(run)
    if kept:
        groups += memorized_row_groups(run, kept, columns)
    n = sum(g["rows"] for g in groups)
    if not n:
        raise ResMemError(f"{run.embeddings / 'train'} holds no rows: rerun `resmem embed`")
    memory_rows = functools.partial(task.memory_rows, cfg, temperature=r.temperature, embedded=embedded)
    first = read_first_row(run.root, next(g for g in groups if g["rows"]), columns)
    dim = first["embedding"].shape[1]
    check_index_config(cfg.index, n, dim, r.distance)
    head = memory_rows(first)  # the task's own checks, before any work
    yield run  # the entry opens: running
    log.info(f"{n} rows x {dim} dims" + (f" ({sum(m['rows'] for m in kept)} of them memorized)" if kept else "")
             + f" -> {cfg.index.num_shards} '{cfg.index.factory}' shard(s), {task.codec} residuals")
    with atomic_dir(run.index) as tmp:
        manifest = build_planned_shards(tmp, run.root, run.location if run.remote else None,
                                        plan_shards(groups, cfg.index.num_shards), columns, memory_rows, dim,
                                        head["residuals"].shape[1], cfg.index, r.distance, r.normalize,
                                        r.temperature, sum(a.nbytes for a in first.values()))
        for m in kept:
            (tmp / m["file"]).parent.mkdir(exist_ok=True)
            shutil.copy2(run.index / m["file"], tmp / m["file"])
        # ids for examples memorized later: past every id of every split and memorized row
        next_id = max([1 + embedded["max_id"]] + [m["first_id"] + m["rows"] for m in kept])
        manifest.update(codec=task.codec, next_id=next_id, memorized=kept, **head["manifest"])
        write_json(tmp / "manifest.json", manifest)
    info = task.memory_info(cfg, manifest)
    for line in [f"memory: {footprint_line(manifest)}", *info.pop("lines", [])]:
        log.info(line)
    return manifest, {"rows": int(n), "num_shards": len(manifest["shards"]),
                      "bytes_per_row": memory_footprint(manifest), **info}


def memorized_records(run: RunDir) -> list[dict]:
    """The records of the rows memorize added to the current index (read before it is
    replaced; each file is checked against its hash when read), without their shard:
    the rebuilt index holds them in its own shards. Rows embedded by an earlier model
    are dropped, with a line saying so."""
    path = run.index / "manifest.json"
    if not path.is_file():
        return []
    try:
        records = load_index_manifest(path).get("memorized", [])
    except ResMemError as e:  # not the suite's writing: its records cannot be trusted
        files = len(list((run.index / "memorized").glob("*.parquet")))
        log.info(f"{e}: no memorized rows carried over"
                 + (f" ({files} file(s) of memorized rows dropped: memorize them again)" if files else ""))
        return []
    model, kept = model_fingerprint(run), []
    for m in records:
        if "file" not in m:  # memorized before rows were kept
            log.info(f"dropped {m['rows']} memorized rows of {m['source']}: no embedding rows were kept")
        elif m.get("model") != model:
            log.info(f"dropped {m['rows']} memorized rows of {m['source']}: embedded by an earlier model "
                     "(memorize them again)")
        else:
            inside(run.index, m["file"])
            kept.append({k: v for k, v in m.items() if k != "shard"})
    return kept
