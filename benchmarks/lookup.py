"""Lookup throughput and recall.

1. Exact search QPS of the sharded service (S = 1, 2, 4, 8 shards, one shard actor each;
   and, where S is above the core count, the same S shards held S / cores to an actor,
   index.shards_per_actor) against one plain FAISS Flat index in the same process using
   every core, over the same memory and queries, in one run, timed in turns. Each actor
   has index.cpus_per_shard = cores / actors and so max(1, round(cores / actors)) FAISS
   threads. Both return the same thing: top-k distances, ids and the
   neighbours' residual rows. The service is called as evaluate and tune call it
   (search_batches: batch i + 1 goes out to the shards before batch i is merged); the
   merge's own time per batch is measured beside it.
2. recall@k of IVF-Flat, IVF-PQ and HNSW against Flat on real embeddings (a finished
   run's train split as memory, its val split as queries).

    python benchmarks/lookup.py --rows 100000 1000000 --real runs/digits runs/fashion_mnist

Writes its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from results import section, write

from resmem_ray.config import IndexConfig
from resmem_ray.core.knn import build_shard, prepare_queries
from resmem_ray.runtime.shards import write_shards
from resmem_ray.runtime.shards import ShardedMemory
from resmem_ray.core.knn import merge_topk, search_shard, set_search_params

DIM, CLASSES, K = 64, 10, 30


QUESTION = "Does spreading the memory over shard actors cost queries/s against one in-process FAISS index?"


def mixture(n: int, dim: int, seed: int, centres: int = 100) -> np.ndarray:
    """Clustered synthetic embeddings (a Gaussian mixture), so recall means something."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim)).astype(np.float32) * 3
    return (means[rng.integers(0, centres, n)] + rng.normal(size=(n, dim)).astype(np.float32))


def one_pass(fn, queries: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(queries), batch):
        fn(queries[s:s + batch])
    return len(queries) / (time.perf_counter() - t0)


def layouts(shard_counts: list[int], cores: int) -> list[tuple[int, int]]:
    """(shards, shards per actor) of each service measured: one actor per shard, and
    cores actors sharing the shards where there are more shards than cores."""
    return [(s, per) for s in shard_counts for per in ([1] + ([s // cores] if s > cores else []))]


def throughput(rows: int, num_queries: int, batch: int, shard_counts: list[int], repeats: int = 3) -> list[dict]:
    """Plain FAISS and every S, all set up at once and timed in turns (best of `repeats`
    passes), so a busy moment of a shared machine hits each alike."""
    import ray

    emb = prepare_queries(mixture(rows, DIM, seed=0), "l2", True)
    queries = prepare_queries(mixture(num_queries, DIM, seed=1), "l2", True)
    rng = np.random.default_rng(2)
    memory_rows = {"ids": np.arange(rows), "labels": rng.integers(0, CLASSES, rows),
                   "residuals": rng.normal(size=(rows, CLASSES)).astype(np.float32)}
    faiss.omp_set_num_threads(os.cpu_count())
    plain = build_shard(emb, "Flat", "l2")
    results = [{"rows": rows, "setup": "plain FAISS Flat, in process", "qps": 0.0,
                "fn": lambda q: search_shard(plain, memory_rows, q, K, "l2"), "batch": batch}]
    with contextlib.ExitStack() as stack:
        for shards, per_actor in layouts(shard_counts, os.cpu_count()):
            d = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            manifest = write_shards(d, emb, memory_rows["ids"], memory_rows["labels"], memory_rows["residuals"],
                                    IndexConfig(num_shards=shards), "l2", True, 1.0)
            actors = -(-shards // per_actor)
            settings = IndexConfig(num_shards=shards, cpus_per_shard=os.cpu_count() / actors,
                                   shards_per_actor=per_actor)
            memory = stack.enter_context(ShardedMemory(d, manifest, settings))
            parts = ray.get([reps[0].search.remote(queries[:batch], K) for reps in memory.actors])
            t0 = time.perf_counter()
            for _ in range(5):
                merge_topk(parts, K)
            threads = max(1, round(settings.cpus_per_shard))
            # search_batches, as evaluate and tune call it: the next batch is out while one is merged
            held = f"{actors} actors x {per_actor} shards" if per_actor > 1 else f"{actors} actors"
            results.append({"rows": rows, "setup": f"sharded, S={shards}: {held}, {threads} FAISS thread(s) each",
                            "qps": 0.0, "merge_ms": (time.perf_counter() - t0) / 5 * 1000, "batch": len(queries),
                            "fn": lambda q, memory=memory: memory.search_batches(q, K, batch)})
        for r in results:
            r["fn"](queries[:batch])  # warm-up
        for _ in range(repeats):
            for r in results:
                r["qps"] = max(r["qps"], one_pass(r["fn"], queries, r["batch"]))
    for r in results:
        del r["fn"], r["batch"]
        r["vs_plain"] = r["qps"] / results[0]["qps"]
        print(f"{r['rows']:>9} rows  {r['setup']:<52} {r['qps']:>9.0f} q/s  {r['vs_plain']:.2f}x", flush=True)
    return results


def factories_for(rows: int) -> list[str]:
    """Flat and approximate indices sized to the memory: about 4 sqrt(n) IVF lists."""
    nlist = max(16, 2 ** int(round(np.log2(4 * np.sqrt(rows)))))
    return ["Flat", f"IVF{nlist},Flat", f"IVF{nlist},PQ8", "HNSW32"]


def recall(run_dir: str) -> list[dict]:
    from resmem_ray.store.artifacts import read_split
    from resmem_ray.store.rundir import RunDir

    run = RunDir(run_dir)
    mem = prepare_queries(read_split(run, "train", "benchmark", ("id", "embedding"))["embedding"], "l2", True)
    q = prepare_queries(read_split(run, "val", "benchmark", ("id", "embedding"))["embedding"], "l2", True)
    exact = build_shard(mem, "Flat", "l2").search(q, K)[1]
    out = []
    for factory in factories_for(len(mem)):
        t0 = time.perf_counter()
        index = build_shard(mem, factory, "l2", train_sample=100_000)
        build_s = time.perf_counter() - t0
        set_search_params(index, nprobe=16, ef_search=64)
        t0 = time.perf_counter()
        found = index.search(q, K)[1]
        search_s = time.perf_counter() - t0
        hits = np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact)])
        out.append({"run": run_dir, "rows": len(mem), "dim": mem.shape[1], "factory": factory,
                    "recall": hits, "build_s": build_s, "qps": len(q) / search_s})
        print(f"{run_dir}: {factory:<22} recall@{K} {hits:.4f}  build {build_s:.2f}s", flush=True)
    return out


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--real", nargs="*", default=["runs/digits", "runs/fashion_mnist"])
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args()
    # logical CPUs: every S's service placed at once, each actor keeping its cores / S share
    services = len(layouts(args.shards, os.cpu_count()))
    ray.init(num_cpus=os.cpu_count() * (1 + services), include_dashboard=False, log_to_driver=False)
    tp = [r for rows in args.rows for r in throughput(rows, args.queries, args.batch, args.shards)]
    rc = [r for run in args.real if Path(run, "embeddings").exists() for r in recall(run)]
    lines = section("Lookup", QUESTION, f"Exact search, {DIM}-dim clustered embeddings, k={K}, {args.queries} queries "
                    f"in batches of {args.batch}; each answer includes the neighbours' {CLASSES}-class "
                    "residual rows. Merge: the driver's global top-k over one batch's shard answers.", "",
                    "| memory rows | setup | queries/s | vs plain | merge (ms / batch) |",
                    "| ---: | --- | ---: | ---: | ---: |")
    lines += [f"| {r['rows']:,} | {r['setup']} | {r['qps']:,.0f} | {r['vs_plain']:.2f}x | "
              f"{r['merge_ms']:.1f} |" if "merge_ms" in r else
              f"| {r['rows']:,} | {r['setup']} | {r['qps']:,.0f} | {r['vs_plain']:.2f}x | |" for r in tp]
    if rc:
        lines += ["", f"Approximate indices against Flat, recall@{K} (memory: train split, queries: "
                  "val split; nprobe=16, efSearch=64):", "",
                  "| run | rows x dim | index | recall@30 | build (s) | queries/s |",
                  "| --- | --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r['run']} | {r['rows']:,} x {r['dim']} | {r['factory']} | {r['recall']:.4f} | "
                  f"{r['build_s']:.2f} | {r['qps']:,.0f} |" for r in rc]
    write(args.out, lines)


if __name__ == "__main__":
    main()
