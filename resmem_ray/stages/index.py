"""Stage index: the memory (train split, and the rows memorize added) as S FAISS shards,
one Ray task per shard.

    RUN/index/manifest.json        dim, metric, shards with row counts and file hashes
    RUN/index/shard-NNNNN.faiss    FAISS's own format
    RUN/index/shard-NNNNN.npz      ids, labels, residual rows (no pickle)
    RUN/index/memorized/*.parquet  embedding rows of memorized examples, carried over

The task turns embedding rows into residual rows (dense: computed here from the stored
logits at resmem.temperature, so the memory always matches the T it is queried with).
"""

from __future__ import annotations

import shutil

import numpy as np

from resmem_ray.core.knn import check_index_config, prepare_queries
from resmem_ray.errors import ResMemError
from resmem_ray.log import stage_log
from resmem_ray.runtime.shards import write_shards
from resmem_ray.schema import Config
from resmem_ray.store.artifacts import load_index_manifest, model_fingerprint, read_memorized, read_split
from resmem_ray.store.files import atomic_dir, inside, write_json
from resmem_ray.store.rundir import RunDir, StageSteps, stage_entry
from resmem_ray.tasks.registry import task_for

log = stage_log("index")


@stage_entry("index")
def build_index(cfg: Config) -> StageSteps:
    task = task_for(cfg)
    run = RunDir(cfg.run_dir)
    embedded = run.stage_output("embed", needed_by="index")
    train = read_split(run, "train", needed_by="index", columns=task.memory_columns)
    kept = memorized_records(run)
    if kept:
        extra = read_memorized(run.index, kept, task.memory_columns)
        train = {c: np.concatenate([train[c], extra[c]]) for c in task.memory_columns}
    n, dim = train["embedding"].shape
    check_index_config(cfg.index, n, dim, cfg.resmem.distance)
    r = cfg.resmem
    memory = task.memory_rows(cfg, train, r.temperature, embedded)
    yield run  # the entry opens: running
    emb = prepare_queries(train["embedding"], r.distance, r.normalize)
    log.info(f"{n} rows x {dim} dims" + (f" ({sum(m['rows'] for m in kept)} of them memorized)" if kept else "")
             + f" -> {cfg.index.num_shards} '{cfg.index.factory}' shard(s), {task.codec} residuals")
    with atomic_dir(run.index) as tmp:
        manifest = write_shards(tmp, emb, train["id"], train["label"], memory["residuals"], cfg.index, r.distance,
                                r.normalize, r.temperature, residual_ids=memory.get("residual_ids"))
        for m in kept:
            (tmp / m["file"]).parent.mkdir(exist_ok=True)
            shutil.copy2(run.index / m["file"], tmp / m["file"])
        # ids for examples memorized later: past every id of every split and memorized row
        next_id = max([1 + embedded["max_id"]] + [m["first_id"] + m["rows"] for m in kept])
        manifest.update(codec=task.codec, next_id=next_id, memorized=kept, **memory["manifest"])
        write_json(tmp / "manifest.json", manifest)
    for line in memory["info"].get("lines", []):
        log.info(line)
    info = {k: v for k, v in memory["info"].items() if k != "lines"}
    return manifest, {"rows": int(n), "num_shards": len(manifest["shards"]), **info}



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
