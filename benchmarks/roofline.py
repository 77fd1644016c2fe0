"""Exact search against the roofline of brute force: a float32 matrix multiply.

Brute-force k-NN over n rows of d dims costs 2*n*d FLOPs per query, almost all in one
matrix multiply, so the machine's measured SGEMM throughput bounds it. This measures
that bound (numpy's and torch's BLAS, best of both), then FAISS Flat in process and the
sharded service (S=2 shard actors, residual rows included) at 1M rows.

    python benchmarks/roofline.py --rows 1000000 --dim 512 --queries 2048
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from results import section, write

from resmem_ray.config import IndexConfig
from resmem_ray.core.knn import build_shard
from resmem_ray.runtime.shards import write_shards
from resmem_ray.runtime.shards import ShardedMemory
from resmem_ray.core.knn import search_shard

K = 30


QUESTION = ("How close does exact search come to the machine's matrix-multiply peak, in process and through "
            "shard actors?")


def best_seconds(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def sgemm_gflops(queries: int, dim: int, rows: int = 65536) -> float:
    """The multiply brute force does: (queries x dim) @ (dim x rows)."""
    a = np.random.default_rng(0).normal(size=(queries, dim)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(dim, rows)).astype(np.float32)
    flops = 2.0 * queries * dim * rows
    torch.set_num_threads(os.cpu_count())
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return max(flops / best_seconds(lambda: a @ b), flops / best_seconds(lambda: ta @ tb)) / 1e9


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args()
    faiss.omp_set_num_threads(os.cpu_count())
    peak = sgemm_gflops(args.queries, args.dim)
    print(f"SGEMM roofline: {peak:.1f} GFLOP/s", flush=True)
    rng = np.random.default_rng(0)
    means = rng.normal(size=(1000, args.dim)).astype(np.float32) * 3
    emb = means[rng.integers(0, 1000, args.rows)] + rng.normal(size=(args.rows, args.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = emb[rng.integers(0, args.rows, args.queries)] + 0.1 * rng.normal(size=(args.queries, args.dim)).astype(np.float32)
    flops = 2.0 * args.rows * args.dim * args.queries
    rows = {"ids": np.arange(args.rows), "labels": np.zeros(args.rows, np.int64),
            "residuals": np.zeros((args.rows, 10), np.float32)}
    plain = build_shard(emb, "Flat", "l2")
    t_plain = best_seconds(lambda: search_shard(plain, rows, q, K, "l2"), repeats=2)
    plain = None  # free the memory before the sharded runs
    ray.init(include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as d:
        manifest = write_shards(Path(d), emb, rows["ids"], rows["labels"], rows["residuals"],
                                IndexConfig(num_shards=2), "l2", True, 1.0)
        with ShardedMemory(Path(d), manifest, IndexConfig(num_shards=2, cpus_per_shard=1)) as memory:
            t_sharded = best_seconds(lambda: memory.search(q, K), repeats=2)
    lines = section("Exact search vs the matrix-multiply roofline", QUESTION,
                    f"{args.rows:,} x {args.dim} memory, {args.queries} queries in one batch, k={K}. Roofline: "
                    f"the best measured SGEMM of the same shape class ({args.queries} x {args.dim} @ "
                    f"{args.dim} x 65536), {peak:.1f} GFLOP/s.", "",
                    "| search | seconds | GFLOP/s | % of roofline |", "| --- | ---: | ---: | ---: |")
    for name, t in (("FAISS Flat, in process", t_plain), ("sharded service, S=2 actors", t_sharded)):
        lines.append(f"| {name} | {t:.2f} | {flops / t / 1e9:.1f} | {100 * flops / t / 1e9 / peak:.0f}% |")
    write(args.out, lines)


if __name__ == "__main__":
    main()
