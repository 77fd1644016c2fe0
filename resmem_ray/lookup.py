"""Sharded residual lookup: shard actors each hold one FAISS shard and its residual
rows; a query batch fans out to all shards in parallel and a merge keeps the global
top-k. With exact (Flat) shards the answer equals one exact index over the memory.

`search_shard` and `merge_topk` are plain functions over arrays; `ShardActor` and
`ShardedMemory` are the thin Ray shell around them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resmem_ray.errors import ResMemError


@dataclass
class Neighbours:
    """The k nearest memory rows of each query, nearest first."""

    distances: np.ndarray  # (n, k) float32, in the configured distance
    ids: np.ndarray  # (n, k) int64 example ids
    labels: np.ndarray  # (n, k) int64
    residuals: np.ndarray  # (n, k, C) float32

    def first(self, k: int) -> "Neighbours":
        return Neighbours(self.distances[:, :k], self.ids[:, :k], self.labels[:, :k],
                          self.residuals[:, :k])


def to_distance(raw: np.ndarray, distance: str) -> np.ndarray:
    """FAISS scores -> the configured distance (smaller is nearer)."""
    if distance == "cosine":  # inner product of unit vectors
        return (1.0 - raw).astype(np.float32)
    if distance == "l2":  # FAISS's L2 metric reports squared distances
        return np.sqrt(np.maximum(raw, 0.0)).astype(np.float32)
    return raw.astype(np.float32)


def search_shard(index, rows: dict[str, np.ndarray], queries: np.ndarray, k: int, distance: str):
    """Local top-k of one shard: (distances, ids, labels, residual rows)."""
    k = min(k, index.ntotal)
    raw, local = index.search(queries, k)
    found = local >= 0  # approximate indices may return fewer than k hits (-1)
    safe = np.where(found, local, 0)
    dist = np.where(found, to_distance(raw, distance), np.inf).astype(np.float32)
    return dist, np.where(found, rows["ids"][safe], -1), rows["labels"][safe], rows["residuals"][safe]


def merge_topk(parts: list[tuple], k: int) -> Neighbours:
    """Global top-k from per-shard answers; ties broken by smaller id, so the result does
    not depend on how the memory was sharded."""
    dist = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((ids, dist), axis=-1)[:, :k]
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    labels = np.concatenate([p[2] for p in parts], axis=1)
    res = np.concatenate([p[3] for p in parts], axis=1)
    return Neighbours(take(dist), take(ids), take(labels), np.take_along_axis(res, order[..., None], axis=1))


class ShardActor:
    """Holds one shard: reads it from the run directory (checked against the manifest)."""

    def __init__(self, index_dir: str, entry: dict, distance: str, num_threads: int):
        import faiss

        from resmem_ray.index import load_shard

        faiss.omp_set_num_threads(num_threads)  # the actor's CPU share, not the whole host
        self.distance, self.error = distance, None
        try:
            self.index, self.rows = load_shard(Path(index_dir), entry)
        except ResMemError as e:  # kept for ready(): Ray drops the cause of a failed __init__
            self.error = e

    def ready(self) -> None:
        if self.error:
            raise self.error

    def search(self, queries: np.ndarray, k: int):
        self.ready()
        return search_shard(self.index, self.rows, queries, k, self.distance)


class ShardedMemory:
    """S shard actors behind one `search(queries, k)` call."""

    def __init__(self, index_dir: Path, manifest: dict, cpus_per_shard: float = 0.5):
        import ray

        self.manifest = manifest
        actor = ray.remote(ShardActor).options(num_cpus=cpus_per_shard)
        threads = max(1, int(round(cpus_per_shard)))
        self.actors = [actor.remote(str(index_dir), entry, manifest["distance"], threads)
                       for entry in manifest["shards"]]
        try:
            ray.get([a.ready.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise

    def search(self, queries: np.ndarray, k: int) -> Neighbours:
        import ray

        m = self.manifest
        if queries.ndim != 2 or queries.shape[1] != m["dim"]:
            raise ResMemError(f"query embeddings have shape {queries.shape}, the index holds "
                              f"{m['dim']}-dim vectors")
        if k > m["rows"]:
            raise ResMemError(f"k={k} is larger than the memory ({m['rows']} rows)")
        ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        parts = ray.get([a.search.remote(ref, k) for a in self.actors])
        return merge_topk(parts, k)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
