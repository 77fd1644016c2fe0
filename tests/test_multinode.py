"""A head and two worker nodes (ray.cluster_utils.Cluster), the run directory an s3://
URI (moto's S3 server). The train split is written into it as the embed stage lays it
out (embeddings/train/part-*.parquet, several row groups each) and the memory is built
as `resmem index` builds it: the driver plans the shards from the files' metadata
(plan_shards) and each shard's task, on a worker node, fetches the files holding its
rows from S3 (the driver's copy of the split is gone first: the nodes do not see its
folder), reads only its own rows and computes their residual rows (build_planned_shards),
which must equal the ones computed here in numpy. Shard actors there fetch the shards
from S3 into their own node's cache, and when the node holding a shard actor is removed
while a stream of lookups is in flight, every answer still equals an exact search over
the same rows.

The cluster runs in a child process with its own RAY_TMPDIR: it cannot share a process
with the test session's Ray instance, and Cluster records its address in the default
temp dir, where another user's `ray.init()` on this machine would find it. All nodes
share this machine's disk, so the shard tasks write their files straight into the
driver's index folder (the bytes-to-the-driver path: tests/test_lookup.py)."""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray  # a subprocess that starts a Ray cluster
@pytest.mark.timeout(240)
def test_node_removed_mid_evaluation_gives_no_fault_answers():
    tmp = tempfile.mkdtemp(prefix="rmn-", dir="/tmp")  # short: Ray's socket paths live here
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "tests.test_multinode", tmp], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=220)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the child's cluster left behind, only ours
        except ProcessLookupError:
            pass
        subprocess.run(["rm", "-rf", tmp])
    print(out[-2000:])
    assert proc.returncode == 0, out[-4000:]
    assert "same answers as without the fault" in out


TEMPERATURE = 2.0
COLUMNS = ("id", "label", "embedding", "logits")  # the classification tasks' memory columns


def memory_rows(rows: dict) -> dict:
    """A classification memory's rows (tasks/classification.py), computed in each shard's
    task from the logits it read."""
    from resmem_ray.core.resmem import residuals

    return {"residuals": residuals(rows["logits"], rows["label"], TEMPERATURE)}


def expected_residuals(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """onehot(y) - softmax(logits / T), here in numpy."""
    z = logits.astype(np.float64) / TEMPERATURE
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return (np.eye(logits.shape[1])[labels] - p).astype(np.float32)


def split_tables(rng, emb, ids, labels, logits, group: int):
    """The split as embed hands it to write_split: Arrow tables (one row group each) in id
    order, rows in any order within one, list columns as Ray Data's tensor columns."""
    from ray.data.extensions import ArrowTensorArray
    import pyarrow as pa

    for a in range(0, len(ids), group):
        rows = a + rng.permutation(min(group, len(ids) - a))
        yield pa.table({"id": ids[rows], "label": labels[rows], "embedding": ArrowTensorArray.from_numpy(emb[rows]),
                        "logits": ArrowTensorArray.from_numpy(logits[rows])})


def main(tmp: str) -> None:
    import shutil

    import ray
    from ray.cluster_utils import Cluster

    from resmem_ray.config import IndexConfig
    from resmem_ray.runtime.shards import ShardedMemory, build_planned_shards
    from resmem_ray.store.artifacts import plan_shards
    from resmem_ray.core.knn import merge_topk, search_shard
    from resmem_ray.store.artifacts import load_shard, split_row_groups, write_split
    from resmem_ray.store.rundir import RunDir
    from resmem_ray.store.files import atomic_dir, write_json

    from .ray_head import MotoS3

    s3 = MotoS3()
    os.environ.update(MotoS3.CREDENTIALS)  # every node inherits them (an instance role on a cloud)
    os.environ["RESMEM_CACHE"] = f"{tmp}/cache-driver"
    # Quick failure detection: a dead raylet is noticed within ~2 s instead of ~30 s.
    system_config = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                     "health_check_failure_threshold": 4}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": system_config})
    try:
        # each worker node has its own local cache: as on separate machines, the run's
        # files reach it only through S3
        workers = [cluster.add_node(num_cpus=1, env_vars={"RESMEM_CACHE": f"{tmp}/cache-node{i}"})
                   for i in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        rng = np.random.default_rng(0)
        n, dim, classes, k = 3000, 16, 10, 10
        emb = rng.standard_normal((n, dim)).astype(np.float32)
        ids, labels = np.arange(n, dtype=np.int64), rng.integers(0, classes, n)
        logits = (2 * rng.standard_normal((n, classes))).astype(np.float32)
        queries = rng.standard_normal((1200, dim)).astype(np.float32)
        settings = IndexConfig(num_shards=2, cpus_per_shard=0.5, residual_dtype="float32")  # rows as computed

        # the embed stage's output: 15 row groups of 200 rows, 8 to a part file
        run = RunDir(s3.uri("multinode/run"))
        run.mark_running("embed", {})
        assert write_split(split_tables(rng, emb, ids, labels, logits, 200), run, "train", 4096) == n
        run.mark_done("embed", {}, rows={"train": n}, max_id=n - 1)  # pushes the split, then the manifest
        parts = {"part-00000.parquet", "part-00001.parquet"}
        assert {f"embeddings/train/{p}" for p in parts} <= set(s3.list("multinode/run"))

        # `resmem index`: the driver plans from the files' metadata, checked against the manifest
        groups = split_row_groups(run, "train", "index", COLUMNS)
        assert len(groups) == 15 and {g["file"].rsplit("/", 1)[1] for g in groups} == parts
        plan = plan_shards(groups, settings.num_shards)
        assert plan[0][-1]["stop"] == 100 and plan[1][0]["start"] == 100  # a boundary inside a row group
        shutil.rmtree(run.embeddings)  # the worker nodes do not see the driver's folder: S3 only
        run.mark_running("index", {})
        with atomic_dir(run.index) as folder:  # the build tasks run on the worker nodes (head: 0 CPUs)
            manifest = build_planned_shards(folder, run.root, run.location, plan, COLUMNS, memory_rows, dim,
                                            classes, settings, "l2", False, TEMPERATURE)
            write_json(folder / "manifest.json", manifest)
        run.mark_done("index", {})  # pushes the shards, then the manifest
        assert "index/shard-00001.faiss" in s3.list("multinode/run")
        read = {}  # node cache -> the split's files its shard tasks fetched from S3
        for p in Path(tmp).glob("cache-*/runs/*/embeddings/train/*.parquet"):
            read.setdefault(p.relative_to(tmp).parts[0], set()).add(p.name)
        assert read and set(read) <= {"cache-node0", "cache-node1"}, read  # read on the workers only
        assert set().union(*read.values()) == parts, read  # shard 1's rows span both files

        # the shards hold every row once, with the residual rows computed in numpy
        held = [load_shard(run.index, entry)[1] for entry in manifest["shards"]]
        assert manifest["rows"] == n and [len(h["ids"]) for h in held] == [1500, 1500]
        stored = {f: np.concatenate([h[f] for h in held]) for f in ("ids", "labels", "residuals")}
        np.testing.assert_array_equal(stored["ids"], ids)  # shard 0 the lower ids, each in id order
        np.testing.assert_array_equal(stored["labels"], labels)
        np.testing.assert_allclose(stored["residuals"], expected_residuals(logits, labels), rtol=0, atol=1e-6)

        import faiss

        exact = faiss.IndexFlatL2(dim)
        exact.add(emb)
        expected = merge_topk([search_shard(exact, {"ids": ids, "labels": labels, "residuals": stored["residuals"]},
                                            queries, k, "l2")], k)

        memory = ShardedMemory(run.index, manifest, settings)
        fetched = [p.relative_to(tmp).parts[0] for p in Path(tmp).glob("cache-node*/runs/*/index/*.faiss")]
        assert fetched, "shard actors did not fetch their shards from S3 into their node's cache"
        node_of = lambda actor: ray.get(actor.__ray_call__.remote(  # noqa: E731
            lambda self: ray.get_runtime_context().get_node_id()))
        before = [node_of(reps[0]) for reps in memory.actors]
        victim = next(w for w in workers if w.node_id == before[0])
        print(f"split rows read from S3 by {dict(sorted((c, sorted(f)) for c, f in read.items()))}; shards "
              f"fetched from S3 by {sorted(set(fetched))}; shard actors on nodes {[b[:8] for b in before]}; "
              f"removing {victim.node_id[:8]}", flush=True)

        answer = {}
        stream = threading.Thread(target=lambda: answer.update(nb=memory.search_batches(queries, k, batch_size=50)))
        stream.start()
        while memory.calls < 4:  # in the middle of the stream
            time.sleep(0.005)
        cluster.remove_node(victim, allow_graceful=False)
        stream.join(timeout=150)
        assert not stream.is_alive(), "lookups did not finish after the node was removed"
        nb = answer["nb"]
        after = [node_of(reps[0]) for reps in memory.actors]
        assert victim.node_id not in after, (before, after)
        np.testing.assert_array_equal(nb.ids, expected.ids)
        np.testing.assert_allclose(nb.distances, expected.distances, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(nb.labels, expected.labels)
        np.testing.assert_array_equal(nb.residuals, expected.residuals)
        print(f"{len(queries)} queries, {memory.calls} batches; actors now on {[a[:8] for a in after]}: "
              "same answers as without the fault", flush=True)
        memory.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
        s3.stop()


if __name__ == "__main__":
    main(sys.argv[1])
