"""Exact search on a GPU: FAISS Flat on the host's CPU cores, the torch backend (float32
matrix multiply + top-k) and torch_lowp (a bfloat16 scan, its candidates re-ranked in
float32), over the same clustered memory and queries. With --device cpu the torch
backends run on the host instead, at a size a CPU can do.

    python benchmarks/gpu_lookup.py --rows 1000000 --dims 64 512
    python benchmarks/gpu_lookup.py --device cpu --rows 200000 --dims 128 --queries 1024

Writes its section of benchmarks/RESULTS.md (--out). Recall@30 is against FAISS Flat
(float32 exact search). "% of matmul" compares the search's multiply FLOP rate with a
plain torch matrix multiply of the same shape (queries x dim @ dim x the backend's chunk
of rows) and precision: float32 for `torch`, bfloat16 for `torch_lowp`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import faiss
import numpy as np
import torch

from results import section, write

from resmem_ray.core.knn import build_shard, prepare_queries
from resmem_ray.core.knn import LowPrecisionFlatIndex, TorchFlatIndex

K = 30


QUESTION = ("How fast is the torch backends' exact search (float32, and bfloat16 with an exact re-rank) against "
            "FAISS Flat, on a GPU or on the CPU?")


def mixture(n: int, dim: int, seed: int, centres: int = 100) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim)).astype(np.float32) * 3
    return means[rng.integers(0, centres, n)] + rng.normal(size=(n, dim)).astype(np.float32)


def best_of(fn, device: str, repeats: int = 3) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_rate(queries: int, dim: int, cols: int, dtype, device: str) -> float:
    """FLOP/s of a plain (queries x dim) @ (dim x cols) multiply in `dtype`."""
    a = torch.randn(queries, dim, device=device, dtype=dtype)
    b = torch.randn(dim, cols, device=device, dtype=dtype)
    return 2.0 * queries * dim * cols / best_of(lambda: a @ b, device, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--queries", type=int, default=8192)
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_lookup.py: torch sees no CUDA GPU here; for the CPU comparison run it with "
                 "--device cpu --rows 200000 --dims 128 --queries 1024")
    faiss.omp_set_num_threads(os.cpu_count())
    torch.set_num_threads(os.cpu_count())
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"the host's {os.cpu_count()} CPU cores"
    lines = section(f"Exact search: FAISS Flat, torch float32 and torch_lowp (bfloat16 + re-rank) on {args.device}",
                    QUESTION,
                    f"torch backends on {where}; FAISS Flat on the host's {os.cpu_count()} CPU threads. "
                    f"{args.queries} queries in one batch, k={K}, L2-normalised clustered embeddings "
                    "(100-centre Gaussian mixture), squared L2. Best of 3 (FAISS: one run).", "",
                    f"| rows x dim | backend | queries/s | recall@{K} vs FAISS Flat | search GFLOP/s "
                    "| plain matmul GFLOP/s (same shape) | % of matmul |",
                    "| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for dim in args.dims:
        emb = prepare_queries(mixture(args.rows, dim, 0), "l2", True)
        q = prepare_queries(mixture(args.queries, dim, 1), "l2", True)
        flops = 2.0 * args.rows * dim * len(q)
        cpu = build_shard(emb, "Flat", "l2")
        t0 = time.perf_counter()
        want = cpu.search(q, K)[1]
        rows = [("faiss-cpu Flat", time.perf_counter() - t0, 1.0, None)]
        cpu = None
        for name, make, dtype in (("torch float32 exact", TorchFlatIndex, torch.float32),
                                  ("torch_lowp bfloat16 + float32 re-rank", LowPrecisionFlatIndex, torch.bfloat16)):
            index = make(emb, False, args.device)
            got = [None]
            s = best_of(lambda: got.__setitem__(0, index.search(q, K)[1]), args.device)
            recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(got[0], want)])
            chunk = min(args.rows, max(K, index.max_scores // len(q)))
            rows.append((name, s, recall, matmul_rate(len(q), dim, chunk, dtype, args.device)))
            index = None  # free device memory before the next one
            if args.device == "cuda":
                torch.cuda.empty_cache()
        for name, s, recall, roof in rows:
            rate = flops / s
            tail = "- | -" if roof is None else f"{roof / 1e9:,.0f} | {100 * rate / roof:.0f}%"
            lines.append(f"| {args.rows:,} x {dim} | {name} | {len(q) / s:,.0f} | {recall:.4f} | "
                         f"{rate / 1e9:,.0f} | {tail} |")
            print(lines[-1], flush=True)
    write(args.out, lines, args.device)


if __name__ == "__main__":
    main()
