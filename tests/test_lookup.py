"""Sharded exact search equals one exact index over the whole memory."""

import faiss
import numpy as np
import pytest

from resmem_ray.errors import ResMemError
from resmem_ray.core.knn import build_shard, prepare_queries
from resmem_ray.core.knn import merge_topk, search_shard


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


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_flat_shards_combined_answer_as_merged_shards(distance):
    from resmem_ray.core.knn import combine_flat

    emb, rows, queries = memory(n=500, d=8)
    cuts = [0, 100, 250, 500]
    shards = [(build_shard(emb[a:b], "Flat", distance), {key: v[a:b] for key, v in rows.items()})
              for a, b in zip(cuts[:-1], cuts[1:])]
    (combined,) = combine_flat(shards)
    one = search_shard(*combined, queries, 12, distance)
    merged = merge_topk([search_shard(index, r, queries, 12, distance) for index, r in shards], 12)
    np.testing.assert_array_equal(one[1], merged.ids)
    np.testing.assert_array_equal(one[3], merged.residuals)
    np.testing.assert_allclose(one[0], merged.distances, rtol=1e-6)
    ivf = [(build_shard(emb[a:b], "IVF4,Flat", distance), r) for (_, r), a, b in zip(shards, cuts[:-1], cuts[1:])]
    assert combine_flat(ivf) == ivf  # not exact shards: searched one by one


def test_merge_breaks_ties_by_id():
    a = (np.array([[1.0, 2.0]]), np.array([[9, 4]]), np.array([[0, 0]]), np.zeros((1, 2, 1)))
    b = (np.array([[1.0, 3.0]]), np.array([[5, 7]]), np.array([[1, 1]]), np.ones((1, 2, 1)))
    assert merge_topk([a, b], 3).ids.tolist() == [[5, 9, 4]]


def test_sharded_memory_actors(ray_session, digits_run):
    """Shard actors over the digits run's index answer like numpy brute force."""
    from resmem_ray.store.artifacts import read_split
    from resmem_ray.store.artifacts import read_index_manifest
    from resmem_ray.runtime.shards import ShardedMemory
    from resmem_ray.store.rundir import RunDir

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


# --- index types, search knobs, backends -------------------------------------------------

def test_ivf_with_all_lists_probed_is_exact_and_hnsw_recalls():
    from resmem_ray.core.knn import set_search_params

    emb, rows, queries = memory(n=2000, d=16)
    exact = build_shard(emb, "Flat", "l2").search(queries, 10)[1]
    ivf = build_shard(emb, "IVF16,Flat", "l2", train_sample=500)
    set_search_params(ivf, nprobe=16, ef_search=64)
    assert faiss.extract_index_ivf(ivf).nprobe == 16
    np.testing.assert_array_equal(ivf.search(queries, 10)[1], exact)
    hnsw = build_shard(emb, "HNSW32", "l2")
    set_search_params(hnsw, nprobe=1, ef_search=128)
    assert faiss.downcast_index(hnsw).hnsw.efSearch == 128
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hnsw.search(queries, 10)[1], exact)])
    assert recall > 0.9
    pq = build_shard(emb, "IVF16,PQ4", "l2", train_sample=1000)
    assert pq.ntotal == 2000


def test_bad_index_config_is_named():
    from resmem_ray.config import IndexConfig
    from resmem_ray.core.knn import check_index_config

    with pytest.raises(ResMemError, match="index.factory='IVF,Nonsense' is not a FAISS factory string"):
        check_index_config(IndexConfig(factory="IVF,Nonsense"), 100, 8, "l2")
    with pytest.raises(ResMemError, match="index.backend=torch is exact search"):
        check_index_config(IndexConfig(factory="HNSW32", backend="torch"), 100, 8, "l2")
    with pytest.raises(ResMemError, match="could not be trained on 10 rows"):
        build_shard(np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32), "IVF64,Flat", "l2")


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_torch_backend_equals_faiss_flat(distance):
    from resmem_ray.core.knn import TorchFlatIndex

    emb, rows, queries = memory(n=500, d=8)
    emb, queries = prepare_queries(emb, distance, False), prepare_queries(queries, distance, False)
    index = build_shard(emb, "Flat", distance)
    torch_index = TorchFlatIndex(emb, distance == "cosine", "cpu", max_scores=40 * 64)  # many chunks
    want, got = search_shard(index, rows, queries, 7, distance), search_shard(torch_index, rows, queries, 7, distance)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], atol=1e-4)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_backend_on_gpu_equals_faiss_flat():
    from resmem_ray.core.knn import TorchFlatIndex

    emb, rows, queries = memory(n=5000, d=32)
    want = build_shard(emb, "Flat", "l2").search(queries, 20)[1]
    got = TorchFlatIndex(emb, False, "cuda").search(queries, 20)[1]
    assert (got == want).mean() > 0.999



def exact_topk(emb, queries, k, inner_product):
    """float64 brute force: (scores like FAISS, row numbers), ties to the smaller row."""
    x, q = emb.astype(np.float64), queries.astype(np.float64)
    scores = q @ x.T if inner_product else (q * q).sum(1)[:, None] + (x * x).sum(1) - 2 * q @ x.T
    rows = np.broadcast_to(np.arange(len(x)), scores.shape)
    order = np.lexsort((rows, -scores if inner_product else scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("n, d", [(20_000, 64), (5_000, 512)])
@pytest.mark.parametrize("inner_product", [False, True])
def test_low_precision_backend_equals_float32_exact_search(n, d, inner_product):
    import torch

    from resmem_ray.core.knn import LowPrecisionFlatIndex

    rng = np.random.default_rng(n + d)
    emb, queries = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(300, d)).astype(np.float32)
    want_s, want_i = exact_topk(emb, queries, 30, inner_product)
    index = LowPrecisionFlatIndex(emb, inner_product, "cpu", max_scores=300 * 3000)  # several chunks
    got_s, got_i = index.search(queries, 30)
    assert got_s.dtype == np.float32 and got_i.dtype == np.int64
    assert np.mean([len(set(a) & set(b)) / 30 for a, b in zip(got_i, want_i)]) == 1.0
    # the exact order, up to rows whose distances float32 cannot tell apart (rare: < 0.1%)
    assert (got_i == want_i).mean() > 0.999
    x, q = emb[got_i].astype(np.float64), queries[:, None].astype(np.float64)
    np.testing.assert_allclose((q * x).sum(-1) if inner_product else ((q - x) ** 2).sum(-1), want_s,
                               rtol=1e-6, atol=1e-6 * np.abs(want_s).max())
    np.testing.assert_allclose(got_s, want_s, rtol=1e-4, atol=1e-4 * np.abs(want_s).max())
    # the bfloat16 scan alone orders them otherwise: the float32 re-rank is what makes it exact
    rough = index._topk(index._low_queries(torch.from_numpy(queries)), 30)[1].numpy()
    assert (rough == want_i).mean() < 0.99


def test_low_precision_backend_breaks_ties_by_row_and_takes_small_shards():
    from resmem_ray.core.knn import LowPrecisionFlatIndex

    emb = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # every row three times
    s, i = LowPrecisionFlatIndex(emb, False, "cpu", max_scores=8).search(emb[[6, 0]], 5)
    assert i.tolist() == [[6, 7, 8, 0, 1], [0, 1, 2, 3, 4]]
    np.testing.assert_array_equal(s, [[0, 0, 0, 2, 2], [0, 0, 0, 2, 2]])
    with pytest.raises(ResMemError, match="precision=tf32 is a CUDA matrix-multiply mode"):
        LowPrecisionFlatIndex(emb, False, "cpu", precision="tf32")


def test_low_precision_backend_needs_flat():
    from resmem_ray.config import IndexConfig
    from resmem_ray.core.knn import check_index_config

    with pytest.raises(ResMemError, match="index.backend=torch_lowp is exact search: it needs index.factory=Flat"):
        check_index_config(IndexConfig(factory="IVF16,Flat", backend="torch_lowp"), 100, 8, "l2")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bfloat16", "float16", "tf32"])
def test_low_precision_backend_on_gpu_recalls_exact_search(precision):
    from resmem_ray.core.knn import LowPrecisionFlatIndex

    rng = np.random.default_rng(7)
    emb, queries = rng.normal(size=(50_000, 128)).astype(np.float32), rng.normal(size=(500, 128)).astype(np.float32)
    for inner_product in (False, True):
        want_s, want_i = exact_topk(emb, queries, 30, inner_product)
        got_s, got_i = LowPrecisionFlatIndex(emb, inner_product, "cuda", max_scores=500 * 8000,
                                             precision=precision).search(queries, 30)
        assert np.mean([len(set(a) & set(b)) / 30 for a, b in zip(got_i, want_i)]) == 1.0
        np.testing.assert_allclose(got_s, want_s, rtol=1e-4, atol=1e-4 * np.abs(want_s).max())

# --- the sharded service: actors, replicas, failover --------------------------------------

def shard_dir(tmp_path, emb, rows, shards):
    from resmem_ray.config import IndexConfig
    from resmem_ray.runtime.shards import write_shards

    folder = tmp_path / f"index-{shards}"
    folder.mkdir()
    manifest = write_shards(folder, emb, rows["ids"], rows["labels"], rows["residuals"],
                            IndexConfig(num_shards=shards), "l2", False, 1.0)
    return folder, manifest


@pytest.mark.parametrize("shards,per_actor", [(1, 1), (2, 1), (3, 1), (5, 2)])
def test_sharded_actors_equal_one_exact_index(ray_session, tmp_path, capsys, shards, per_actor):
    from resmem_ray.config import IndexConfig
    from resmem_ray.runtime.shards import ShardedMemory
    from resmem_ray.core.resmem import resmem_probs, softmax

    emb, rows, queries = memory(n=400, d=8)
    whole = search_shard(build_shard(emb, "Flat", "l2"), rows, queries, 12, "l2")
    folder, manifest = shard_dir(tmp_path, emb, rows, shards)
    with ShardedMemory(folder, manifest, IndexConfig(cpus_per_shard=0.25, shards_per_actor=per_actor)) as sharded:
        actors = len(sharded.actors)
        nb = sharded.search(queries, 12)
        batched = sharded.search_batches(queries, 12, batch_size=7)  # pipelined: next batch sent before a merge
        empty = sharded.search_batches(queries[:0], 12, batch_size=7)
    assert actors == -(-shards // per_actor)  # 5 shards, 2 to an actor: 3 actors (2 + 2 + 1)
    assert f"{shards} shards in {actors} actor(s)" in capsys.readouterr().out
    np.testing.assert_array_equal(nb.ids, whole[1])
    for name in ("distances", "ids", "labels", "residuals"):
        np.testing.assert_array_equal(getattr(batched, name), getattr(nb, name))
    assert empty.ids.shape == (0, 12) and empty.residuals.shape == (0, 12, 5)
    probs = softmax(np.random.default_rng(1).normal(size=(len(queries), 5)))
    np.testing.assert_allclose(resmem_probs(probs, nb.residuals, nb.distances, 0.5),
                               resmem_probs(probs, whole[3], whole[0], 0.5), rtol=1e-6)


@pytest.mark.parametrize("replicas", [1, 2])
def test_query_stream_survives_shard_actor_kills(ray_session, tmp_path, replicas):
    import ray

    from resmem_ray.config import IndexConfig
    from resmem_ray.runtime.shards import ShardedMemory

    emb, rows, _ = memory(n=600, d=8)
    stream = np.random.default_rng(5).normal(size=(12, 25, 8)).astype(np.float32)
    folder, manifest = shard_dir(tmp_path, emb, rows, 2)
    settings = IndexConfig(cpus_per_shard=0.25, replicas=replicas)
    with ShardedMemory(folder, manifest, settings) as sharded:
        clean = [sharded.search(q, 9) for q in stream]
        answers = []
        for i, q in enumerate(stream):
            if i in (3, 7):  # kill a shard actor; Ray restarts it and it reloads its shard
                ray.kill(sharded.actors[i % 2][sharded.calls % replicas], no_restart=False)
            answers.append(sharded.search(q, 9))
    for got, want in zip(answers, clean):
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.residuals, want.residuals)


def test_use_gpu_without_gpu_falls_back_to_cpu(ray_session, tmp_path, capsys):
    from resmem_ray.config import IndexConfig
    from resmem_ray.runtime.shards import ShardedMemory

    emb, rows, queries = memory(n=100, d=8)
    folder, manifest = shard_dir(tmp_path, emb, rows, 1)
    with ShardedMemory(folder, manifest, IndexConfig(use_gpu=True, cpus_per_shard=0.25)) as sharded:
        assert sharded.placement == ["faiss-cpu"]
        assert sharded.search(queries, 3).ids.shape == (40, 3)
    assert "the Ray cluster has no GPU: shard actors run on CPU" in capsys.readouterr().out


def test_torch_backend_through_actors(ray_session, tmp_path):
    from resmem_ray.config import IndexConfig
    from resmem_ray.runtime.shards import ShardedMemory

    emb, rows, queries = memory(n=300, d=8)
    whole = search_shard(build_shard(emb, "Flat", "l2"), rows, queries, 5, "l2")
    folder, manifest = shard_dir(tmp_path, emb, rows, 2)
    with ShardedMemory(folder, manifest, IndexConfig(backend="torch", cpus_per_shard=0.25)) as sharded:
        assert sharded.placement == ["torch-cpu", "torch-cpu"]
        np.testing.assert_array_equal(sharded.search(queries, 5).ids, whole[1])


def test_float16_residuals_halve_storage_and_keep_predictions(ray_session, tmp_path):
    from resmem_ray.config import IndexConfig
    from resmem_ray.store.artifacts import load_shard
    from resmem_ray.runtime.shards import write_shards
    from resmem_ray.core.resmem import resmem_probs, softmax

    emb, rows, queries = memory(n=300, d=8, C=50)
    rows["residuals"] = rows["residuals"] / 10  # residuals lie in [-1, 1]
    probs = softmax(np.random.default_rng(3).normal(size=(len(queries), 50)))
    answers = {}
    for dtype in ("float32", "float16"):
        folder = tmp_path / dtype
        folder.mkdir()
        manifest = write_shards(folder, emb, rows["ids"], rows["labels"], rows["residuals"],
                                IndexConfig(num_shards=1, residual_dtype=dtype), "l2", False, 1.0)
        index, shard = load_shard(folder, manifest["shards"][0])
        assert shard["residuals"].dtype == np.dtype(dtype) and manifest["residual_dtype"] == dtype
        d, i, _, res = search_shard(index, shard, queries, 10, "l2")
        answers[dtype] = (resmem_probs(probs, res, d, 0.5), manifest["shards"][0]["bytes"]["shard-00000.npz"])
    np.testing.assert_allclose(answers["float16"][0], answers["float32"][0], atol=2e-4)
    assert answers["float16"][0].argmax(1).tolist() == answers["float32"][0].argmax(1).tolist()
    assert answers["float16"][1] < 0.6 * answers["float32"][1]


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_low_precision_backend_through_actors_equals_faiss(ray_session, tmp_path, distance):
    from resmem_ray.config import IndexConfig
    from resmem_ray.runtime.shards import ShardedMemory, write_shards

    emb, rows, queries = memory(n=3000, d=32)
    emb, queries = prepare_queries(emb, distance, False), prepare_queries(queries, distance, False)
    folder = tmp_path / "index"
    folder.mkdir()
    manifest = write_shards(folder, emb, rows["ids"], rows["labels"], rows["residuals"],
                            IndexConfig(num_shards=2), distance, False, 1.0)
    answers = {}
    for backend in ("faiss", "torch_lowp"):
        with ShardedMemory(folder, manifest, IndexConfig(backend=backend, cpus_per_shard=0.25)) as sharded:
            answers[backend] = sharded.search(queries, 20)
            placement = sharded.placement
    assert placement == ["torch_lowp-cpu", "torch_lowp-cpu"]
    want, got = answers["faiss"], answers["torch_lowp"]
    np.testing.assert_array_equal(np.sort(got.ids, 1), np.sort(want.ids, 1))
    same = got.ids == want.ids  # the rest: neighbours whose distances float32 cannot tell apart
    assert same.mean() > 0.99
    np.testing.assert_allclose(got.distances, want.distances, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got.labels[same], want.labels[same])
    np.testing.assert_array_equal(got.residuals[same], want.residuals[same])


def test_merge_equals_a_full_sort_with_ties_and_missing_hits():
    """The partition-then-sort merge gives a full lexsort's answer, also where the k-th
    distance is tied across shards and where shards return fewer than k hits (inf, -1)."""
    rng = np.random.default_rng(4)
    n, k, C = 200, 6, 3
    parts = []
    for s in range(4):
        dist = np.sort(rng.integers(0, 8, (n, k)).astype(np.float32), 1)  # small integers: many ties
        dist[rng.random((n, k)) < 0.05] = np.inf  # a missing hit reads as inf
        dist = np.sort(dist, 1)
        ids = rng.permutation(10_000)[:n * k].reshape(n, k) + 10_000 * s
        parts.append((dist, ids, ids % 7, rng.normal(size=(n, k, C)).astype(np.float32),
                      rng.integers(0, 50, (n, k, 2)).astype(np.int32)))
    got = merge_topk(parts, k)
    cat = [np.concatenate([p[j] for p in parts], axis=1) for j in range(5)]
    order = np.lexsort((cat[1], cat[0]), axis=-1)[:, :k]
    for name, j in (("distances", 0), ("ids", 1), ("labels", 2), ("residuals", 3), ("residual_ids", 4)):
        want = np.take_along_axis(cat[j], order if cat[j].ndim == 2 else order[..., None], axis=1)
        np.testing.assert_array_equal(getattr(got, name), want, err_msg=name)
    assert merge_topk(parts, 100).ids.shape == (n, 4 * k)  # k over the candidates: all of them, sorted


def test_int8_residuals_round_trip_within_half_a_step():
    from resmem_ray.core.knn import pack_residuals, unpack_residuals

    rng = np.random.default_rng(5)
    res = rng.uniform(-1, 1, (50, 7)).astype(np.float32)
    res[3] = 0  # a row of zeros: scale 1, codes 0
    packed = pack_residuals(res, "int8")
    assert packed["residuals"].dtype == np.int8 and packed["residual_scale"].shape == (50,)
    back = unpack_residuals(packed, np.arange(50))
    step = np.abs(res).max(1, keepdims=True) / 127
    assert np.all(np.abs(back - res) <= step / 2 + 1e-7)
    assert np.abs(back).max(1).tolist() == pytest.approx(np.abs(res).max(1).tolist(), rel=1e-6)
    at = np.array([[3, 4], [4, 3]])  # any shape of row numbers, as search_shard takes them
    np.testing.assert_array_equal(unpack_residuals(packed, at)[0, 1], back[4])
    assert pack_residuals(res, "float16")["residuals"].dtype == np.float16


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_rerank_from_kept_vectors_gives_exact_answers(distance):
    """A PQ index proposes candidates; their exact distances from the full-precision
    vectors pick the k. With every row a candidate the answer is exact search's."""
    emb, rows, queries = memory(n=400, d=16)
    emb, queries = prepare_queries(emb, distance, False), prepare_queries(queries, distance, False)
    exact = search_shard(build_shard(emb, "Flat", distance), rows, queries, 10, distance)
    pq = build_shard(emb, "PQ4x4", distance)
    coarse = search_shard(pq, rows, queries, 10, distance)
    assert (coarse[1] != exact[1]).any()  # the compressed codes alone get some neighbours wrong
    kept = {**rows, "vectors": emb}
    full = search_shard(pq, kept, queries, 10, distance, rerank=40)  # 40 x 10 candidates: every row
    np.testing.assert_array_equal(full[1], exact[1])
    np.testing.assert_allclose(full[0], exact[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(full[3], exact[3])
    some = search_shard(pq, kept, queries, 10, distance, rerank=4)
    recall = lambda got: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got[1], exact[1])])  # noqa: E731
    assert recall(some) > recall(coarse)
    truth = ((queries[:, None] - emb[None]) ** 2).sum(-1) if distance == "l2" else 1 - queries @ emb.T
    row = {i: r for r, i in enumerate(rows["ids"])}
    got = np.array([[truth[q, row[i]] for i in ids] for q, ids in enumerate(some[1])])
    np.testing.assert_allclose(some[0] ** (2 if distance == "l2" else 1), got, rtol=1e-4, atol=1e-5)


def test_kept_vectors_are_written_checked_and_asked_for(tmp_path):
    from resmem_ray.config import IndexConfig
    from resmem_ray.core.knn import check_index_config
    from resmem_ray.runtime.shards import LocalShards, _build_shard_files, _delivered
    from resmem_ray.store.artifacts import footprint_line, memory_footprint

    emb, rows, queries = memory(n=400, d=16, C=5)
    settings = IndexConfig(factory="IVF4,PQ4x4", residual_dtype="int8", keep_vectors=True)
    entry = _delivered(str(tmp_path), _build_shard_files(emb, rows["ids"], rows["labels"], rows["residuals"],
                                                         settings, "l2", 0))
    assert np.array_equal(np.load(tmp_path / "shard-00000.vectors.npy"), emb)
    manifest = {"rows": 400, "residual_dtype": "int8", "shards": [entry]}
    per_row = memory_footprint(manifest)
    assert per_row["vectors"] == pytest.approx(16 * 4, abs=1)  # 64 bytes a row, and the .npy header
    assert per_row["rows"] < 8 + 8 + 5 + 4 + 8  # id, label, int8 codes, scale (and the npz's own bytes)
    assert "bytes per row on disk (index" in footprint_line(manifest)
    exact = search_shard(build_shard(emb, "Flat", "l2"), rows, queries, 10, "l2")
    shards = LocalShards(tmp_path, [entry], "l2", IndexConfig(rerank=40, nprobe=4))
    got = shards.search(queries, 10)
    np.testing.assert_array_equal(got.ids, exact[1])
    np.testing.assert_allclose(got.residuals, exact[3], atol=np.abs(rows["residuals"]).max() / 254 + 1e-6)
    with pytest.raises(ResMemError, match="index.rerank=4 re-ranks from the shards' full-precision vectors"):
        entry_without = {**entry, "files": {n: h for n, h in entry["files"].items() if "vectors" not in n},
                         "bytes": {n: b for n, b in entry["bytes"].items() if "vectors" not in n}}
        LocalShards(tmp_path, [entry_without], "l2", IndexConfig(rerank=4))
    np.save(tmp_path / "shard-00000.vectors.npy", emb[:10])
    with pytest.raises(ResMemError, match="shard-00000.vectors.npy has"):
        LocalShards(tmp_path, [entry], "l2", IndexConfig(rerank=4))
    with pytest.raises(ResMemError, match="index.keep_vectors=true keeps full-precision vectors"):
        check_index_config(IndexConfig(keep_vectors=True), 100, 8, "l2")

