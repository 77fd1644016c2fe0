"""Sharded residual lookup: shard actors each hold one FAISS shard and its residual
rows; a query batch fans out to all shards in parallel and a merge keeps the global
top-k. With exact (Flat) shards the answer equals one exact index over the memory.

`search_shard` and `merge_topk` are plain functions over arrays; `ShardActor` and
`ShardedMemory` are the thin Ray shell around them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resmem_ray.config import IndexConfig
from resmem_ray.errors import ResMemError


@dataclass
class Neighbours:
    """The k nearest memory rows of each query, nearest first."""

    distances: np.ndarray  # (n, k) float32, in the configured distance
    ids: np.ndarray  # (n, k) int64 example ids
    labels: np.ndarray  # (n, k) int64
    residuals: np.ndarray  # (n, k, C) float32; sparse codec: (n, k, m) probabilities of residual_ids
    residual_ids: np.ndarray | None = None  # (n, k, m) token ids of the sparse codec (sparse.py)

    def first(self, k: int) -> "Neighbours":
        return Neighbours(self.distances[:, :k], self.ids[:, :k], self.labels[:, :k],
                          self.residuals[:, :k], None if self.residual_ids is None else self.residual_ids[:, :k])


def to_distance(raw: np.ndarray, distance: str) -> np.ndarray:
    """FAISS scores -> the configured distance (smaller is nearer)."""
    if distance == "cosine":  # inner product of unit vectors
        return (1.0 - raw).astype(np.float32)
    if distance == "l2":  # FAISS's L2 metric reports squared distances
        return np.sqrt(np.maximum(raw, 0.0)).astype(np.float32)
    return raw.astype(np.float32)


def search_shard(index, rows: dict[str, np.ndarray], queries: np.ndarray, k: int, distance: str):
    """Local top-k of one shard: (distances, ids, labels, residual rows[, residual ids])."""
    k = min(k, index.ntotal)
    raw, local = index.search(queries, k)
    found = local >= 0  # approximate indices may return fewer than k hits (-1)
    safe = np.where(found, local, 0)
    dist = np.where(found, to_distance(raw, distance), np.inf).astype(np.float32)
    out = (dist, np.where(found, rows["ids"][safe], -1), rows["labels"][safe], rows["residuals"][safe])
    return out + (rows["residual_ids"][safe],) if "residual_ids" in rows else out


def merge_topk(parts: list[tuple], k: int) -> Neighbours:
    """Global top-k from per-shard answers; ties broken by smaller id, so the result does
    not depend on how the memory was sharded."""
    dist = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((ids, dist), axis=-1)[:, :k]
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    labels = np.concatenate([p[2] for p in parts], axis=1)
    rows = [np.take_along_axis(np.concatenate([p[j] for p in parts], axis=1), order[..., None], axis=1)
            for j in range(3, len(parts[0]))]  # residual rows, and residual ids when sparse
    return Neighbours(take(dist), take(ids), take(labels), *rows)


FAISS_GPU_MAX_K = 2048  # FAISS GPU's k and nprobe limit (without cuVS)


def set_search_params(index, nprobe: int, ef_search: int) -> None:
    """Apply the search-time knobs that this index type has."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = ef_search


class TorchFlatIndex:
    """Exact search as a matrix multiply and a top-k in torch, on the GPU when there is
    one, chunked over memory rows to bound the (queries x rows) score matrix. Answers
    like a FAISS Flat index: squared L2 (smaller first) or inner product (larger first)."""

    def __init__(self, vectors: np.ndarray, inner_product: bool, device: str,
                 max_scores: int | None = None):
        import torch

        self.device, self.inner_product = device, inner_product
        # score-matrix budget per step: 4 GB on a GPU, 512 MB on the host
        self.max_scores = max_scores or (1 << 30 if device.startswith("cuda") else 1 << 27)
        self.db = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(device)
        self.sq_norms = (self.db * self.db).sum(1)
        self.ntotal = len(vectors)

    def search(self, queries: np.ndarray, k: int):
        import torch

        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        chunk = max(k, self.max_scores // max(len(q), 1))
        best_s = best_i = None
        with torch.inference_mode():
            for start in range(0, self.ntotal, chunk):
                scores = q @ self.db[start:start + chunk].T
                if not self.inner_product:  # ||q - x||^2 = ||q||^2 + ||x||^2 - 2 q.x
                    scores = (q * q).sum(1, keepdim=True) + self.sq_norms[start:start + chunk] - 2 * scores
                s, i = torch.topk(scores, min(k, scores.shape[1]), dim=1, largest=self.inner_product)
                i += start
                if best_s is not None:
                    s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                    s, pos = torch.topk(s, min(k, s.shape[1]), dim=1, largest=self.inner_product)
                    i = torch.gather(i, 1, pos)
                best_s, best_i = s, i
        return best_s.cpu().numpy(), best_i.cpu().numpy()


def place_index(index, backend: str, use_gpu: bool):
    """The shard's searchable index: FAISS on CPU or GPU, or the torch exact backend.
    Returns (index, where) with `where` a word for the logs."""
    import faiss
    import torch

    if backend == "torch":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        vectors = index.reconstruct_n(0, index.ntotal)
        return TorchFlatIndex(vectors, index.metric_type == faiss.METRIC_INNER_PRODUCT, device), f"torch-{device}"
    if use_gpu:
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            resources = faiss.StandardGpuResources()  # one per searching thread: the actor's
            gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)  # the actor's GPU is device 0
            gpu_index.resources = resources  # keep alive as long as the index
            return gpu_index, "faiss-gpu"
        print("[lookup] index.use_gpu=true but faiss has no GPU support or sees no GPU here: "
              "searching on CPU", flush=True)
    return index, "faiss-cpu"


class ShardActor:
    """Holds one shard: reads it from the run directory (checked against the manifest).
    Ray restarts a dead actor, which runs __init__ again and so reloads its shard."""

    def __init__(self, index_dir: str, entry: dict, distance: str, settings: IndexConfig,
                 run_uri: str | None = None):
        import faiss

        from resmem_ray.index import load_shard

        threads = max(1, int(round(settings.cpus_per_shard)))
        faiss.omp_set_num_threads(threads)  # the actor's CPU share, not the whole host
        self.distance, self.error, self.where = distance, None, None
        try:
            if run_uri:  # a URI run: this node's mirror of its index (fetched if missing)
                from resmem_ray.rundir import RunDir

                index_dir = str(RunDir(run_uri, pull=("index",)).index)
            index, self.rows = load_shard(Path(index_dir), entry)
            set_search_params(index, settings.nprobe, settings.ef_search)
            self.index, self.where = place_index(index, settings.backend, settings.use_gpu)
        except ResMemError as e:  # kept for ready(): Ray drops the cause of a failed __init__
            self.error = e

    def ready(self) -> str:
        if self.error:
            raise self.error
        return self.where

    def search(self, queries: np.ndarray, k: int):
        self.ready()
        if self.where == "faiss-gpu" and k > FAISS_GPU_MAX_K:
            raise ResMemError(f"k={k} is over FAISS GPU's limit of {FAISS_GPU_MAX_K}: lower k, or set "
                              "index.backend=torch or index.use_gpu=false")
        return search_shard(self.index, self.rows, queries, k, self.distance)


class ShardedMemory:
    """S shards x R replicas of shard actors behind one `search(queries, k)` call.

    Each query batch goes to one replica of every shard (round robin over replicas). A
    replica that dies is restarted by Ray and reloads its shard; meanwhile its query is
    sent to the next replica, or, with one replica, retried by Ray once it is back.
    """

    def __init__(self, index_dir: Path, manifest: dict, settings: IndexConfig | None = None):
        import ray

        settings = settings or IndexConfig()
        self.manifest, self.replicas, self.calls = manifest, settings.replicas, 0
        num_actors = len(manifest["shards"]) * settings.replicas
        gpus = 0.0
        if settings.use_gpu:
            available = ray.cluster_resources().get("GPU", 0)
            if available:
                gpus = min(1.0, available / num_actors)
            else:
                print("[lookup] index.use_gpu=true but the Ray cluster has no GPU: shard actors "
                      "run on CPU", flush=True)
        actor = ray.remote(ShardActor).options(
            num_cpus=settings.cpus_per_shard, num_gpus=gpus, max_restarts=-1,
            scheduling_strategy="DEFAULT",  # not captured by an enclosing placement group (a sweep trial's)
            # with one replica Ray retries in-flight queries after the restart; with more,
            # search() sends them to another replica at once
            max_task_retries=-1 if settings.replicas == 1 else 0)
        from resmem_ray.storage import uri_of

        source = uri_of(index_dir)
        self.actors = [[actor.remote(str(index_dir), entry, manifest["distance"], settings,
                                     source[0] if source else None)
                        for _ in range(settings.replicas)] for entry in manifest["shards"]]
        try:
            self.placement = ray.get([a.ready.remote() for reps in self.actors for a in reps])
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
        first = self.calls % self.replicas
        self.calls += 1
        futures = [reps[first].search.remote(ref, k) for reps in self.actors]
        parts = [self._get(shard, future, first, ref, k) for shard, future in enumerate(futures)]
        return merge_topk(parts, k)

    def search_batches(self, queries: np.ndarray, k: int, batch_size: int) -> Neighbours:
        """`search` over many queries, `batch_size` per round trip, with progress."""
        parts, t0 = [], time.time()
        for start in range(0, len(queries), batch_size):
            parts.append(self.search(queries[start:start + batch_size], k))
            done = min(start + batch_size, len(queries))
            print(f"[lookup] {done}/{len(queries)} queries ({done / max(time.time() - t0, 1e-9):.0f}/s)",
                  flush=True)
        fields = ("distances", "ids", "labels", "residuals") + (("residual_ids",) if parts[0].residual_ids is not None
                                                               else ())
        return Neighbours(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))

    def _get(self, shard: int, future, replica: int, ref, k: int):
        """The answer of one shard, failing over to its other replicas."""
        import ray
        from ray.exceptions import RayActorError

        for _ in range(1, 4 * self.replicas):
            try:
                return ray.get(future)
            except RayActorError:
                if self.replicas == 1:
                    raise
                replica = (replica + 1) % self.replicas
                future = self.actors[shard][replica].search.remote(ref, k)
        return ray.get(future)

    def close(self) -> None:
        import ray

        for reps in self.actors:
            for a in reps:
                ray.kill(a, no_restart=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
