"""Stage index: the memory (train split) as S FAISS shards, one Ray task per shard.

    RUN/index/manifest.json        dim, metric, shards with row counts and file hashes
    RUN/index/shard-NNNNN.faiss    FAISS's own format
    RUN/index/shard-NNNNN.npz      ids, labels, residual rows (no pickle)

The task turns embedding rows into residual rows (dense: computed here from the stored
logits at resmem.temperature, so the memory always matches the T it is queried with).
"""

from __future__ import annotations

from resmem_ray.core.knn import check_index_config, prepare_queries
from resmem_ray.runtime.shards import write_shards
from resmem_ray.schema import Config
from resmem_ray.store.artifacts import read_split
from resmem_ray.store.files import atomic_dir, write_json
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.registry import task_for


def build_index(cfg: Config) -> dict:
    task = task_for(cfg)
    run = RunDir(cfg.run_dir)
    embedded = run.stage_output("embed", needed_by="index")
    train = read_split(run, "train", needed_by="index", columns=task.memory_columns)
    n, dim = train["embedding"].shape
    check_index_config(cfg.index, n, dim, cfg.resmem.distance)
    r = cfg.resmem
    memory = task.memory_rows(cfg, train, r.temperature, embedded)
    run.mark_running("index", cfg.to_dict())
    emb = prepare_queries(train["embedding"], r.distance, r.normalize)
    print(f"[index] {n} rows x {dim} dims -> {cfg.index.num_shards} '{cfg.index.factory}' shard(s), "
          f"{task.codec} residuals", flush=True)
    with atomic_dir(run.index) as tmp:
        manifest = write_shards(tmp, emb, train["id"], train["label"], memory["residuals"], cfg.index, r.distance,
                                r.normalize, r.temperature, residual_ids=memory.get("residual_ids"))
        # ids for examples memorized later: past every id of every split
        manifest.update(codec=task.codec, next_id=1 + embedded["max_id"], **memory["manifest"])
        write_json(tmp / "manifest.json", manifest)
    for line in memory["info"].get("lines", []):
        print(f"[index] {line}", flush=True)
    info = {k: v for k, v in memory["info"].items() if k != "lines"}
    run.mark_done("index", cfg.to_dict(), rows=int(n), num_shards=len(manifest["shards"]), **info)
    return manifest

