"""A head and two worker nodes (ray.cluster_utils.Cluster), the memory in an s3:// run
directory (moto's S3 server): index tasks build the shards on the worker nodes, shard
actors there fetch them from S3 into their own node's cache, and when the node holding a
shard actor is removed while a stream of lookups is in flight, every answer still
equals the no-fault exact answer.

The cluster runs in a child process with its own RAY_TMPDIR: it cannot share a process
with the test session's Ray instance, and Cluster records its address in the default
temp dir, where another user's `ray.init()` on this machine would find it."""

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


def main(tmp: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from resmem_ray.config import IndexConfig
    from resmem_ray.runtime.shards import write_shards
    from resmem_ray.runtime.shards import ShardedMemory
    from resmem_ray.core.knn import merge_topk, search_shard
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
        res = rng.standard_normal((n, classes)).astype(np.float32)
        queries = rng.standard_normal((1200, dim)).astype(np.float32)
        settings = IndexConfig(num_shards=2, cpus_per_shard=0.5)

        run = RunDir(s3.uri("multinode/run"))
        run.mark_running("index", {})
        with atomic_dir(run.index) as folder:  # the build tasks run on the worker nodes (head: 0 CPUs)
            manifest = write_shards(folder, emb, ids, labels, res, settings, "l2", False, 1.0)
            write_json(folder / "manifest.json", manifest)
        run.mark_done("index", {})  # pushes the shards, then the manifest
        assert "index/shard-00001.faiss" in s3.list("multinode/run")

        import faiss

        exact = faiss.IndexFlatL2(dim)
        exact.add(emb)
        expected = merge_topk([search_shard(exact, {"ids": ids, "labels": labels, "residuals": res},
                                            queries, k, "l2")], k)

        memory = ShardedMemory(run.index, manifest, settings)
        fetched = [p.relative_to(tmp).parts[0] for p in Path(tmp).glob("cache-node*/runs/*/index/*.faiss")]
        assert fetched, "shard actors did not fetch their shards from S3 into their node's cache"
        node_of = lambda actor: ray.get(actor.__ray_call__.remote(  # noqa: E731
            lambda self: ray.get_runtime_context().get_node_id()))
        before = [node_of(reps[0]) for reps in memory.actors]
        victim = next(w for w in workers if w.node_id == before[0])
        print(f"shards fetched from S3 by {sorted(set(fetched))}; shard actors on nodes "
              f"{[b[:8] for b in before]}; removing {victim.node_id[:8]}", flush=True)

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
