"""Stage 3, index: the memory (train split) as S FAISS shards, one Ray task per shard.

    RUN/index/manifest.json        dim, metric, shards with row counts and file hashes
    RUN/index/shard-NNNNN.faiss    FAISS's own format
    RUN/index/shard-NNNNN.npz      ids, labels, residual rows (no pickle)

Residuals are computed here from the stored logits at resmem.temperature, so the memory
always matches the T it is queried with.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from resmem_ray.config import Config
from resmem_ray.embed import read_split
from resmem_ray.errors import ResMemError
from resmem_ray.resmem import normalize_rows, residuals
from resmem_ray.rundir import RunDir, atomic_dir, read_json, sha256, verify_hashes, write_json


def faiss_metric(distance: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if distance == "cosine" else faiss.METRIC_L2


def prepare_queries(x: np.ndarray, distance: str, normalize: bool) -> np.ndarray:
    """Embeddings as the index sees them: float32, unit rows for cosine or when asked."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return normalize_rows(x) if (normalize or distance == "cosine") else x


def build_shard(embeddings: np.ndarray, factory: str, distance: str) -> faiss.Index:
    """One FAISS index over a shard's rows (embeddings already prepared)."""
    index = faiss.index_factory(embeddings.shape[1], factory, faiss_metric(distance))
    if not index.is_trained:
        index.train(embeddings)
    index.add(embeddings)
    return index


def _build_and_write(embeddings, ids, labels, residual_rows, factory, distance, folder, shard) -> dict:
    index = build_shard(embeddings, factory, distance)
    name = f"shard-{shard:05d}"
    faiss.write_index(index, str(Path(folder) / f"{name}.faiss"))
    np.savez(Path(folder) / f"{name}.npz", ids=ids, labels=labels, residuals=residual_rows)
    files = [f"{name}.faiss", f"{name}.npz"]
    return {"shard": shard, "rows": int(len(ids)), "files": {f: sha256(Path(folder) / f) for f in files}}


def build_index(cfg: Config) -> dict:
    import ray

    run = RunDir(cfg.run_dir)
    train = read_split(run, "train", needed_by="index", columns=("id", "label", "embedding", "logits"))
    n, dim = train["embedding"].shape
    if cfg.index.num_shards > n:
        raise ResMemError(f"index.num_shards={cfg.index.num_shards} is more than the memory's {n} rows")
    run.mark_running("index", cfg.to_dict())
    r = cfg.resmem
    emb = prepare_queries(train["embedding"], r.distance, r.normalize)
    res = residuals(train["logits"], train["label"], r.temperature)
    bounds = np.linspace(0, n, cfg.index.num_shards + 1).astype(int)
    print(f"[index] {n} rows x {dim} dims -> {cfg.index.num_shards} '{cfg.index.factory}' shard(s)",
          flush=True)
    build = ray.remote(num_cpus=0.5)(_build_and_write)
    with atomic_dir(run.index) as tmp:
        refs = [build.remote(emb[a:b], train["id"][a:b], train["label"][a:b], res[a:b],
                             cfg.index.factory, r.distance, str(tmp), s)
                for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        shards = ray.get(refs)
        manifest = {"dim": int(dim), "rows": int(n), "num_classes": int(res.shape[1]),
                    "factory": cfg.index.factory, "distance": r.distance, "normalize": r.normalize,
                    "temperature": r.temperature, "shards": shards}
        write_json(tmp / "manifest.json", manifest)
    run.mark_done("index", cfg.to_dict(), rows=int(n), num_shards=len(shards))
    return manifest


def read_index_manifest(run: RunDir, needed_by: str) -> dict:
    run.stage_output("index", needed_by=needed_by)
    path = run.index / "manifest.json"
    if not path.is_file():
        raise ResMemError(f"{path} is missing: rerun `resmem index`")
    return read_json(path)


def load_shard(folder: Path, entry: dict) -> tuple[faiss.Index, dict[str, np.ndarray]]:
    """A shard's index and rows, each file checked against the index manifest."""
    verify_hashes(folder, entry["files"], f"index shard {entry['shard']}")
    name = f"shard-{entry['shard']:05d}"
    index = faiss.read_index(str(folder / f"{name}.faiss"))
    with np.load(folder / f"{name}.npz", allow_pickle=False) as z:
        rows = {k: z[k] for k in ("ids", "labels", "residuals")}
    if index.ntotal != entry["rows"] or len(rows["ids"]) != entry["rows"]:
        raise ResMemError(f"index shard {entry['shard']}: holds {index.ntotal} vectors, "
                          f"the manifest says {entry['rows']}")
    return index, rows
