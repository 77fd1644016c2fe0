"""Sharded exact search equals one exact index over the whole memory."""

import faiss
import numpy as np
import pytest

from resmem_ray.errors import ResMemError
from resmem_ray.index import build_shard, prepare_queries
from resmem_ray.lookup import merge_topk, search_shard


def memory(n=300, d=12, C=5, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    rows = {"ids": np.arange(1000, 1000 + n), "labels": rng.integers(0, C, n),
            "residuals": rng.normal(size=(n, C)).astype(np.float32)}
    return emb, rows, rng.normal(size=(40, d)).astype(np.float32)


@pytest.mark.parametrize("distance", ["l2", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sharded_search_equals_single_index(distance, shards):
    emb, rows, queries = memory()
    emb, queries = prepare_queries(emb, distance, False), prepare_queries(queries, distance, False)
    k = 17
    whole = search_shard(build_shard(emb, "Flat", distance), rows, queries, k, distance)
    bounds = np.linspace(0, len(emb), shards + 1).astype(int)
    parts = [search_shard(build_shard(emb[a:b], "Flat", distance), {c: v[a:b] for c, v in rows.items()},
                          queries, k, distance) for a, b in zip(bounds[:-1], bounds[1:])]
    merged = merge_topk(parts, k)
    np.testing.assert_array_equal(merged.ids, whole[1])
    np.testing.assert_allclose(merged.distances, whole[0], rtol=1e-5)
    np.testing.assert_array_equal(merged.labels, whole[2])
    np.testing.assert_array_equal(merged.residuals, whole[3])
    # and the answer is the brute-force one
    if distance != "cosine":
        d = ((queries[:, None] - emb[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(merged.ids, rows["ids"][np.argsort(d, axis=1, kind="stable")[:, :k]])


def test_merge_breaks_ties_by_id():
    a = (np.array([[1.0, 2.0]]), np.array([[9, 4]]), np.array([[0, 0]]), np.zeros((1, 2, 1)))
    b = (np.array([[1.0, 3.0]]), np.array([[5, 7]]), np.array([[1, 1]]), np.ones((1, 2, 1)))
    assert merge_topk([a, b], 3).ids.tolist() == [[5, 9, 4]]


def test_sharded_memory_actors(ray_session, digits_run):
    """Shard actors over the digits run's index answer like numpy brute force."""
    from resmem_ray.embed import read_split
    from resmem_ray.index import read_index_manifest
    from resmem_ray.lookup import ShardedMemory
    from resmem_ray.rundir import RunDir

    run = RunDir(digits_run)
    manifest = read_index_manifest(run, "test")
    train = read_split(run, "train", "test")
    test = read_split(run, "test", "test")
    mem = prepare_queries(train["embedding"], "l2", True)
    q = prepare_queries(test["embedding"][:50], "l2", True)
    with ShardedMemory(run.index, manifest) as sharded:
        nb = sharded.search(q, 10)
        d = np.sqrt(((q[:, None] - mem[None]) ** 2).sum(-1))
        expected = np.argsort(d, axis=1, kind="stable")[:, :10]
        assert (nb.ids == train["id"][expected]).mean() > 0.99  # float ties aside
        np.testing.assert_allclose(nb.distances, np.take_along_axis(d, expected, 1), atol=1e-4)
        with pytest.raises(ResMemError, match=r"shape \(50, 3\), the index holds 16-dim vectors"):
            sharded.search(q[:, :3], 10)
        with pytest.raises(ResMemError, match="k=5000 is larger than the memory"):
            sharded.search(q, 5000)
