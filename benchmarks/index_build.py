"""Index build time and peak memory: Flat, IVF and IVF-PQ over 512-dim clustered
embeddings at 100k, 300k and 1.28M rows (ImageNet's train set).

    python benchmarks/index_build.py --rows 100000 300000 1280000

Each build runs in a fresh subprocess, so its peak resident memory (which includes the
float32 embeddings themselves, shown beside it) is its own. Writes its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DIM = 512
# PQ64x4fs: 64 four-bit codes per vector (32 bytes), FAISS's fast-scan PQ; 8-bit PQ64
# training costs minutes per 10k rows with this faiss-cpu build on 2 cores.
FACTORIES = ["Flat", "IVF1024,Flat", "IVF1024,PQ64x4fs"]


QUESTION = "How long does each index type take to build for an ImageNet-size memory, and at what memory peak?"


def build_once(rows: int, factory: str) -> dict:
    import faiss
    import numpy as np

    from resmem_ray.core.knn import build_shard

    faiss.omp_set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    means = rng.normal(size=(1000, DIM)).astype(np.float32) * 3
    emb = means[rng.integers(0, 1000, rows)]
    emb += rng.standard_normal(emb.shape, dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    with open("/proc/self/status") as f:  # resident memory before the build: data + libraries
        rss_before = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
    t0 = time.perf_counter()
    index = build_shard(emb, factory, "l2", train_sample=100_000)
    seconds = time.perf_counter() - t0
    path = f"/tmp/index_build_{os.getpid()}.faiss"
    faiss.write_index(index, path)
    size = os.path.getsize(path)
    os.remove(path)
    return {"rows": rows, "factory": factory, "build_s": seconds, "index_bytes": size,
            "data_bytes": emb.nbytes, "rss_before": rss_before, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000, 1_280_000])
    parser.add_argument("--one", nargs=2, metavar=("ROWS", "FACTORY"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(build_once(int(args.one[0]), args.one[1])))
        return
    from results import section, write

    results = []
    for rows in args.rows:
        for factory in FACTORIES:
            out = subprocess.run([sys.executable, __file__, "--one", str(rows), factory],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{rows:>9} x {DIM}  {factory:<14} build {r['build_s']:7.1f}s  index "
                  f"{r['index_bytes'] / 2**20:7.0f} MiB  peak RSS {r['peak_rss'] / 2**30:5.2f} GiB", flush=True)
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = section("Index build", QUESTION,
                    f"{DIM}-dim L2-normalised Gaussian-mixture embeddings (1000 centres); IVF / PQ trained on "
                    "100k sampled rows; one process, all cores. RSS before: the process with its "
                    "embeddings loaded; peak: the high-water mark through the build.", "",
                    "| rows | index | build (s) | index file (GiB) | embeddings (GiB) | RSS before (GiB) "
                    "| peak RSS (GiB) |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    lines += [f"| {r['rows']:,} | {r['factory']} | {r['build_s']:.1f} | {gib(r['index_bytes'])} | "
              f"{gib(r['data_bytes'])} | {gib(r['rss_before'])} | {gib(r['peak_rss'])} |" for r in results]
    write(args.out, lines)


if __name__ == "__main__":
    main()
