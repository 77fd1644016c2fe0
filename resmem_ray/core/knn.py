"""Nearest-neighbour search over arrays: build a shard's index, search it, merge the
answers of several shards into one global top-k. With exact (Flat) shards the merged
answer equals one exact index over the whole memory (ties go to the smaller id).

Plain functions over numpy arrays, FAISS or torch underneath; no Ray (runtime/shards.py
is the Ray shell around them).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np

from resmem_ray.core.resmem import normalize_rows
from resmem_ray.errors import ResMemError
from resmem_ray.log import stage_log
from resmem_ray.schema import IndexConfig

log = stage_log("lookup")


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
    if cfg.backend in ("torch", "torch_lowp") and cfg.factory != "Flat":
        raise ResMemError(f"index.backend={cfg.backend} is exact search: it needs index.factory=Flat, "
                          f"got {cfg.factory!r}")
    if cfg.keep_vectors and cfg.factory == "Flat":
        raise ResMemError("index.keep_vectors=true keeps full-precision vectors to re-rank a compressed index "
                          "(IVF-PQ, SQ, ...); index.factory='Flat' is exact already")


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


def combine_flat(shards: list[tuple]) -> list[tuple]:
    """Exact (Flat) shards held by one process as one Flat index over their rows in order:
    the same answers, from one scan instead of one per shard (a scan's fixed costs and
    per-shard top-k are paid once). Other index types stay as they are."""
    first = shards[0][0]
    if len(shards) < 2 or not all(type(index) is type(first) and isinstance(index, faiss.IndexFlat)
                                  and index.metric_type == first.metric_type for index, _ in shards):
        return shards
    index = faiss.IndexFlat(first.d, first.metric_type)
    for shard, _ in shards:
        index.add(shard.reconstruct_n(0, shard.ntotal))
    rows = {key: np.concatenate([r[key] for _, r in shards]) for key in shards[0][1]}
    return [(index, rows)]


@dataclass
class Neighbours:
    """The k nearest memory rows of each query, nearest first."""

    distances: np.ndarray  # (n, k) float32, in the configured distance
    ids: np.ndarray  # (n, k) int64 example ids
    labels: np.ndarray  # (n, k) int64
    residuals: np.ndarray  # (n, k, C) float32; sparse codec: (n, k, m) probabilities of residual_ids
    residual_ids: np.ndarray | None = None  # (n, k, m) token ids of the sparse codec (sparse.py)

    def as_part(self) -> tuple:
        """The form of search_shard's answer, for another merge_topk."""
        out = (self.distances, self.ids, self.labels, self.residuals)
        return out if self.residual_ids is None else out + (self.residual_ids,)

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


def pack_residuals(residual_rows: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """Residual rows as a shard stores them (index.residual_dtype): float32, float16, or
    int8 with one float32 scale per row (max |r| / 127: 1 byte per class instead of 4)."""
    if dtype != "int8":
        return {"residuals": residual_rows.astype(dtype, copy=False)}
    peak = np.abs(residual_rows).max(axis=1) if residual_rows.size else np.zeros(len(residual_rows))
    scale = np.where(peak > 0, peak / 127, 1).astype(np.float32)
    codes = np.clip(np.rint(residual_rows / scale[:, None]), -127, 127).astype(np.int8)
    return {"residuals": codes, "residual_scale": scale}


def unpack_residuals(rows: dict[str, np.ndarray], at: np.ndarray) -> np.ndarray:
    """The residual rows of a shard's rows `at` (any shape of row numbers), as stored or,
    for int8 codes, scaled back to float32."""
    if "residual_scale" not in rows:
        return rows["residuals"][at]
    return rows["residuals"][at].astype(np.float32) * rows["residual_scale"][at][..., None]


def rerank_exact(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int,
                 inner_product: bool) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each query's candidate rows (-1: none) by exact scores against the
    full-precision `vectors` (memory-mapped: only the candidates' rows are read), in FAISS's
    form: squared L2 or inner product, ties to the smaller row, -1 where fewer than k."""
    worst = -np.inf if inner_product else np.inf
    found = candidates >= 0
    wanted, where = np.unique(candidates[found], return_inverse=True)
    table = np.asarray(vectors[wanted], dtype=np.float32)  # sorted rows: one pass over the file
    scores = np.full(candidates.shape, worst, np.float32)
    slot = np.zeros(candidates.shape, np.int64)
    slot[found] = where
    block = max(1, (1 << 24) // max(candidates.shape[1] * vectors.shape[1], 1))  # bounds the gathered rows
    for a in range(0, len(queries), block):
        q, x = queries[a:a + block, None, :], table[slot[a:a + block]]
        s = (q * x).sum(-1) if inner_product else ((q - x) ** 2).sum(-1)
        scores[a:a + block] = np.where(found[a:a + block], s, worst)
    rows = np.where(found, candidates, np.iinfo(np.int64).max)
    order = np.lexsort((rows, -scores if inner_product else scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(np.where(found, candidates, -1), order, 1)


def search_shard(index, rows: dict[str, np.ndarray], queries: np.ndarray, k: int, distance: str, rerank: int = 1):
    """Local top-k of one shard: (distances, ids, labels, residual rows[, residual ids]).
    With `rerank` > 1 and the shard's full-precision vectors in rows["vectors"], the index
    proposes rerank * k candidates and the exact distances pick the k."""
    k = min(k, index.ntotal)
    if rerank > 1 and "vectors" in rows:
        raw, local = index.search(queries, min(rerank * k, index.ntotal))
        raw, local = rerank_exact(rows["vectors"], queries, local, k, index.metric_type == faiss.METRIC_INNER_PRODUCT)
    else:
        raw, local = index.search(queries, k)
    found = local >= 0  # approximate indices may return fewer than k hits (-1)
    safe = np.where(found, local, 0)
    dist = np.where(found, to_distance(raw, distance), np.inf).astype(np.float32)
    out = (dist, np.where(found, rows["ids"][safe], -1), rows["labels"][safe], unpack_residuals(rows, safe))
    return out + (rows["residual_ids"][safe],) if "residual_ids" in rows else out


def merge_topk(parts: list[tuple], k: int) -> Neighbours:
    """Global top-k from per-shard answers; ties broken by smaller id, so the result does
    not depend on how the memory was sharded."""
    dist = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    order = topk_order(dist, ids, k)
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    # labels, residual rows (and residual ids when sparse): each part's winners copied
    # straight to their places, never the concatenation of every part's rows
    rows = [np.empty(order.shape + a.shape[2:], dtype=a.dtype) for a in parts[0][2:]]
    start = 0
    for part in parts:
        width = part[0].shape[1]
        r, c = np.nonzero((order >= start) & (order < start + width))
        local = order[r, c] - start
        for out, a in zip(rows, part[2:]):
            out[r, c] = a[r, local]
        start += width
    return Neighbours(take(dist), take(ids), *rows)


def topk_order(dist: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of the k smallest (distance, id) pairs in that order: a
    partition finds the k nearest, and only those are sorted; rows with a tie at the
    k-th distance are sorted whole."""
    n, total = dist.shape
    k = min(k, total)
    if k == total:
        return np.lexsort((ids, dist), axis=-1)
    inside = dist <= np.partition(dist, k - 1, axis=1)[:, k - 1:k]  # the k nearest and ties at the k-th
    tied = inside.sum(1) != k
    order = np.empty((n, k), dtype=np.int64)
    cand = np.nonzero(inside[~tied])[1].reshape(-1, k)
    sub = lambda a: np.take_along_axis(a[~tied], cand, axis=1)  # noqa: E731
    order[~tied] = np.take_along_axis(cand, np.lexsort((sub(ids), sub(dist)), axis=-1), axis=1)
    if tied.any():
        order[tied] = np.lexsort((ids[tied], dist[tied]), axis=-1)[:, :k]
    return order


FAISS_GPU_MAX_K = 2048  # FAISS GPU's k and nprobe limit (without cuVS)


def set_search_params(index, nprobe: int, ef_search: int) -> None:
    """Apply the search-time knobs that this index type has."""
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

    def _queries(self, queries: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)

    def _scores(self, q, start: int, stop: int):
        """Scores of the queries against memory rows [start, stop)."""
        scores = q @ self.db[start:stop].T
        if not self.inner_product:  # ||q - x||^2 = ||q||^2 + ||x||^2 - 2 q.x
            scores = (q * q).sum(1, keepdim=True) + self.sq_norms[start:stop] - 2 * scores
        return scores

    def _topk(self, q, keep: int):
        """The best `keep` rows per query: a top-k per chunk of memory rows, then a top-k
        over the best so far and the chunk's. Returns (scores, row numbers)."""
        import torch

        chunk = max(keep, self.max_scores // max(len(q), 1))
        best_s = best_i = None
        for start in range(0, self.ntotal, chunk):
            scores = self._scores(q, start, start + chunk)
            s, i = torch.topk(scores, min(keep, scores.shape[1]), dim=1, largest=self.inner_product)
            i += start
            if best_s is not None:
                s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                s, pos = torch.topk(s, min(keep, s.shape[1]), dim=1, largest=self.inner_product)
                i = torch.gather(i, 1, pos)
            best_s, best_i = s, i
        return best_s, best_i

    def search(self, queries: np.ndarray, k: int):
        import torch

        with torch.inference_mode():
            s, i = self._topk(self._queries(queries), k)
        return s.cpu().numpy(), i.cpu().numpy()


@contextmanager
def _tf32(on: bool):
    """CUDA float32 matrix multiplies in TF32 inside the block (process-wide flag, restored)."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on or before
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class LowPrecisionFlatIndex(TorchFlatIndex):
    """Exact search with the scan in reduced precision (index.backend=torch_lowp): the
    memory is scored in bfloat16 (tensor cores on a GPU; float16, or float32 rows in TF32
    on CUDA, by `precision`), each chunk of rows keeps max(2k, k + margin) candidates,
    and the candidates are re-ranked exactly in float32. The answer is float32 exact
    search's whenever the true top k are among the candidates; ties go to the smaller row.

    For L2 the multiply yields the ranking key ||x||^2 - 2 q.x itself: rows carry their
    squared norm (as two low-precision parts, summed by the float32 accumulator) and
    queries a matching 1, so no pass over the score matrix adds the norms. Holds the
    float32 rows beside the low-precision copy (1.5x the memory of `torch`; tf32 with L2: 2x)."""

    def __init__(self, vectors: np.ndarray, inner_product: bool, device: str,
                 max_scores: int | None = None, precision: str = "bfloat16", margin: int = 32):
        import torch

        if precision not in ("bfloat16", "float16", "tf32"):
            raise ResMemError(f"precision={precision!r}: choose bfloat16, float16 or tf32")
        if precision == "tf32" and not device.startswith("cuda"):
            raise ResMemError(f"precision=tf32 is a CUDA matrix-multiply mode, not available on {device}")
        super().__init__(vectors, inner_product, device, max_scores)
        self.precision, self.margin = precision, margin
        self.dtype = torch.float32 if precision == "tf32" else getattr(torch, precision)
        rows = self.db
        if not inner_product:  # [x, hi, lo, 0...] with hi + lo = ||x||^2; width a multiple of 8
            hi = self.sq_norms.to(torch.bfloat16 if precision == "tf32" else self.dtype).float()
            rows = self._augment(rows, hi, self.sq_norms - hi)
        self.low = rows.to(self.dtype)

    def _augment(self, x, hi, lo):
        import torch

        pad = -(x.shape[1] + 2) % 8
        return torch.cat([x, hi[:, None], lo[:, None], x.new_zeros(len(x), pad)], 1)

    def _low_queries(self, q):
        """Queries in the scan's precision: [-2q, 1, 1, 0...] for L2 (q.x + its norms)."""
        import torch

        if not self.inner_product:
            ones = torch.ones(len(q), device=q.device)
            q = self._augment(-2 * q, ones, ones)
        return q.to(self.dtype)

    def _scores(self, q, start: int, stop: int):
        """Ranking keys from the low-precision multiply: the inner product, or the squared
        L2 distance less ||q||^2 (the same for every row of a query)."""
        import torch

        rows = self.low[start:stop].T
        if q.is_cuda and q.dtype != torch.float32:  # float32 output: the accumulator, not rounded
            return torch.mm(q, rows, out_dtype=torch.float32)
        return q @ rows  # on the host, keys rounded to bfloat16: the margin absorbs it

    def _exact(self, q, rows):
        """float32 scores of each query against its candidate rows, elementwise (a matrix
        multiply could run in TF32)."""
        x = self.db[rows]  # (queries, candidates, dim)
        return (q[:, None] * x).sum(-1) if self.inner_product else ((q[:, None] - x) ** 2).sum(-1)

    def search(self, queries: np.ndarray, k: int):
        import torch

        keep = min(self.ntotal, max(2 * k, k + self.margin))
        with torch.inference_mode():
            q = self._queries(queries)
            with _tf32(self.precision == "tf32"):
                rows = self._topk(self._low_queries(q), keep)[1]
            block = max(1, self.max_scores // (4 * keep * q.shape[1]))  # bounds the gathered rows
            exact = torch.cat([self._exact(q[a:a + block], rows[a:a + block]) for a in range(0, len(q), block)])
        s, i = exact.cpu().numpy(), rows.cpu().numpy()
        order = np.lexsort((i, -s if self.inner_product else s), axis=-1)[:, :k]
        return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def place_index(index, backend: str, use_gpu: bool):
    """The shard's searchable index: FAISS on CPU or GPU, or a torch exact backend.
    Returns (index, where) with `where` a word for the logs."""
    import torch

    if backend in ("torch", "torch_lowp"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        vectors = index.reconstruct_n(0, index.ntotal)
        exact = TorchFlatIndex if backend == "torch" else LowPrecisionFlatIndex
        return exact(vectors, index.metric_type == faiss.METRIC_INNER_PRODUCT, device), f"{backend}-{device}"
    if use_gpu:
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            resources = faiss.StandardGpuResources()  # one per searching thread: the actor's
            gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)  # the actor's GPU is device 0
            gpu_index.resources = resources  # keep alive as long as the index
            return gpu_index, "faiss-gpu"
        log.info("index.use_gpu=true but faiss has no GPU support or sees no GPU here: "
                 "searching on CPU")
    return index, "faiss-cpu"
