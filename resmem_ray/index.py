"""Stage 3, index: the memory (train split) as S FAISS shards, one Ray task per shard.

    RUN/index/manifest.json        dim, metric, shards with row counts and file hashes
    RUN/index/shard-NNNNN.faiss    FAISS's own format
    RUN/index/shard-NNNNN.npz      ids, labels, residual rows (no pickle)

Residuals are computed here from the stored logits at resmem.temperature, so the memory
always matches the T it is queried with.
"""

from __future__ import annotations

import io
from pathlib import Path

import faiss
import numpy as np

from resmem_ray.config import Config, IndexConfig
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


def check_index_config(cfg: IndexConfig, rows: int, dim: int, distance: str) -> None:
    """Fail before any work on a factory FAISS does not know or more shards than rows."""
    try:
        faiss.index_factory(dim, cfg.factory, faiss_metric(distance))
    except RuntimeError as e:
        raise ResMemError(f"config key index.factory={cfg.factory!r} is not a FAISS factory string "
                          f"for {dim}-dim vectors: {str(e).strip().splitlines()[-1]}") from None
    if cfg.num_shards > rows:
        raise ResMemError(f"index.num_shards={cfg.num_shards} is more than the memory's {rows} rows")
    if cfg.backend == "torch" and cfg.factory != "Flat":
        raise ResMemError(f"index.backend=torch is exact search: it needs index.factory=Flat, "
                          f"got {cfg.factory!r}")


def build_shard(embeddings: np.ndarray, factory: str, distance: str, train_sample: int = 100_000,
                seed: int = 0) -> faiss.Index:
    """One FAISS index over a shard's rows (embeddings already prepared); IVF / PQ indices
    are trained on a random sample of at most `train_sample` rows."""
    index = faiss.index_factory(embeddings.shape[1], factory, faiss_metric(distance))
    if not index.is_trained:
        sample = embeddings
        if len(embeddings) > train_sample:
            rows = np.random.default_rng(seed).choice(len(embeddings), train_sample, replace=False)
            sample = embeddings[np.sort(rows)]
        try:
            index.train(sample)
        except RuntimeError as e:
            raise ResMemError(f"index.factory={factory!r} could not be trained on {len(sample)} rows "
                              f"(too few for its clusters?): {str(e).strip().splitlines()[-1]}") from None
    index.add(embeddings)
    return index


def _build_shard_files(embeddings, ids, labels, residual_rows, cfg: IndexConfig, distance, shard,
                       residual_ids=None) -> dict:
    """A shard's files as bytes: the task needs no storage, so it runs on any node and
    the caller writes the files wherever the run directory is."""
    faiss.omp_set_num_threads(1)  # one task per shard, several tasks per host
    index = build_shard(embeddings, cfg.factory, distance, cfg.train_sample, seed=shard)
    rows = io.BytesIO()
    sparse = {} if residual_ids is None else {"residual_ids": residual_ids}  # sparse codec (sparse.py)
    np.savez(rows, ids=ids, labels=labels, residuals=residual_rows.astype(cfg.residual_dtype, copy=False), **sparse)
    name = f"shard-{shard:05d}"
    return {"shard": shard, "rows": int(len(ids)),
            "data": {f"{name}.faiss": faiss.serialize_index(index).tobytes(), f"{name}.npz": rows.getvalue()}}


def write_shards(folder: Path, embeddings: np.ndarray, ids: np.ndarray, labels: np.ndarray,
                 residual_rows: np.ndarray, cfg: IndexConfig, distance: str, normalize: bool,
                 temperature: float, first_shard: int = 0, residual_ids: np.ndarray | None = None) -> dict:
    """Split rows into cfg.num_shards contiguous shards, build each in its own Ray task (on
    any node: it returns the files' bytes) and write them to `folder`; return the index
    manifest (not written: the caller places it atomically).
    With `residual_ids`, residual rows are sparse: the probabilities of those token ids."""
    import ray

    n, dim = embeddings.shape
    check_index_config(cfg, n, dim, distance)
    bounds = np.linspace(0, n, cfg.num_shards + 1).astype(int)
    # "DEFAULT": not captured by an enclosing placement group (a `resmem sweep` trial's)
    build = ray.remote(num_cpus=0.5, scheduling_strategy="DEFAULT")(_build_shard_files)
    refs = [build.remote(embeddings[a:b], ids[a:b], labels[a:b], residual_rows[a:b], cfg, distance,
                         first_shard + s, None if residual_ids is None else residual_ids[a:b])
            for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    shards = []
    for i in range(len(refs)):  # in shard order, one shard's bytes held at a time
        built, refs[i] = ray.get(refs[i]), None
        files = [Path(folder) / name for name in built["data"]]
        for p in files:
            p.write_bytes(built["data"][p.name])
        shards.append({"shard": built["shard"], "rows": built["rows"], "files": {p.name: sha256(p) for p in files},
                       "bytes": {p.name: p.stat().st_size for p in files}})
    return {"dim": int(dim), "rows": int(n), "num_classes": int(residual_rows.shape[1]),
            "factory": cfg.factory, "distance": distance, "normalize": normalize,
            "temperature": temperature, "residual_dtype": cfg.residual_dtype, "shards": shards}


def build_index(cfg: Config) -> dict:
    if cfg.model.name == "gpt2_lm":  # token memory, sparse residuals
        from resmem_ray.lm import build_lm_index

        return build_lm_index(cfg)
    run = RunDir(cfg.run_dir)
    train = read_split(run, "train", needed_by="index", columns=("id", "label", "embedding", "logits"))
    n, dim = train["embedding"].shape
    check_index_config(cfg.index, n, dim, cfg.resmem.distance)
    run.mark_running("index", cfg.to_dict())
    r = cfg.resmem
    emb = prepare_queries(train["embedding"], r.distance, r.normalize)
    res = residuals(train["logits"], train["label"], r.temperature)
    print(f"[index] {n} rows x {dim} dims -> {cfg.index.num_shards} '{cfg.index.factory}' shard(s)",
          flush=True)
    with atomic_dir(run.index) as tmp:
        manifest = write_shards(tmp, emb, train["id"], train["label"], res, cfg.index, r.distance,
                                r.normalize, r.temperature)
        # ids for examples memorized later: past every id of every split
        manifest["next_id"] = 1 + run.stage_output("embed", needed_by="index")["max_id"]
        write_json(tmp / "manifest.json", manifest)
    run.mark_done("index", cfg.to_dict(), rows=int(n), num_shards=len(manifest["shards"]))
    return manifest


def read_index_manifest(run: RunDir, needed_by: str) -> dict:
    run.stage_output("index", needed_by=needed_by)
    path = run.index / "manifest.json"
    if not path.is_file():
        raise ResMemError(f"{path} is missing: rerun `resmem index`")
    return read_json(path)


def load_shard(folder: Path, entry: dict) -> tuple[faiss.Index, dict[str, np.ndarray]]:
    """A shard's index and rows, each file checked against the index manifest."""
    for name, size in entry["bytes"].items():  # cheap check first: truncated or replaced files
        actual = (folder / name).stat().st_size if (folder / name).is_file() else None
        if actual != size:
            raise ResMemError(f"index shard {entry['shard']}: {folder / name} has "
                              f"{'no file' if actual is None else f'{actual} bytes'}, the manifest says {size} bytes")
    verify_hashes(folder, entry["files"], f"index shard {entry['shard']}")
    name = f"shard-{entry['shard']:05d}"
    index = faiss.read_index(str(folder / f"{name}.faiss"))
    with np.load(folder / f"{name}.npz", allow_pickle=False) as z:
        rows = {k: z[k] for k in ("ids", "labels", "residuals", "residual_ids") if k in z.files}
    if index.ntotal != entry["rows"] or len(rows["ids"]) != entry["rows"]:
        raise ResMemError(f"index shard {entry['shard']}: holds {index.ntotal} vectors, "
                          f"the manifest says {entry['rows']}")
    return index, rows
