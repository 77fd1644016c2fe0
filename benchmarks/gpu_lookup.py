"""Exact search on a GPU: the torch backend (matrix multiply + top-k) against FAISS Flat
on the host's CPU cores, over the same clustered memory and queries.

    python benchmarks/gpu_lookup.py --rows 1000000 --dims 64 512 --out gpu.md

Needs a CUDA GPU; prints a table (markdown) and writes it to --out. Also measures the
GPU's float32 matrix-multiply throughput, the roofline of brute-force search.
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np
import torch

from resmem_ray.core.knn import build_shard, prepare_queries
from resmem_ray.core.knn import TorchFlatIndex

K = 30


def mixture(n: int, dim: int, seed: int, centres: int = 100) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim)).astype(np.float32) * 3
    return means[rng.integers(0, centres, n)] + rng.normal(size=(n, dim)).astype(np.float32)


def best_of(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_tflops(n: int = 8192) -> float:
    a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
    return 2 * n ** 3 / best_of(lambda: a @ b, 5) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--queries", type=int, default=8192)
    parser.add_argument("--out", default="gpu.md")
    args = parser.parse_args()
    faiss.omp_set_num_threads(os.cpu_count())
    roof = matmul_tflops()
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, faiss {faiss.__version__} "
             f"(CPU, {os.cpu_count()} threads). float32 matmul: {roof:.1f} TFLOP/s.", "",
             f"| rows x dim | backend | queries/s | recall@{K} vs FAISS Flat | search TFLOP/s | % of matmul |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for dim in args.dims:
        emb = prepare_queries(mixture(args.rows, dim, 0), "l2", True)
        q = prepare_queries(mixture(args.queries, dim, 1), "l2", True)
        flops = 2.0 * args.rows * dim * len(q)
        cpu = build_shard(emb, "Flat", "l2")
        t0 = time.perf_counter()
        want = cpu.search(q, K)[1]
        cpu_s = time.perf_counter() - t0
        gpu = TorchFlatIndex(emb, False, "cuda")
        got = [None]
        gpu_s = best_of(lambda: got.__setitem__(0, gpu.search(q, K)[1]))
        recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(got[0], want)])
        for name, s, r in (("faiss-cpu Flat", cpu_s, 1.0), ("torch-cuda exact", gpu_s, recall)):
            tflops = flops / s / 1e12
            pct = f"{100 * tflops / roof:.0f}%" if name.startswith("torch") else "-"
            lines.append(f"| {args.rows:,} x {dim} | {name} | {len(q) / s:,.0f} | {r:.4f} | {tflops:.2f} | {pct} |")
        print(lines[-2], lines[-1], sep="\n", flush=True)
        gpu = cpu = None  # free GPU memory before the next size
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
