"""An ImageNet-size memory on one small machine: 1.28M rows of 512-dim embeddings with
1000-class residuals stored as float16, in S exact shards held by Ray actors, answering
10k ResMem queries. Prints the memory footprint and the machine's peak memory in use.

    python benchmarks/imagenet_memory.py --rows 1280000 --dim 512 --classes 1000 \
        --shards 4 --residual-dtype float16 --queries 10000

Shards are generated and written one at a time, so the driver never holds the whole
memory; residuals are onehot(y) - softmax(logits) of synthetic logits, like real ones.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from results import section, write

from resmem_ray.config import IndexConfig
from resmem_ray.core.knn import prepare_queries
from resmem_ray.runtime.shards import write_shards
from resmem_ray.runtime.shards import ShardedMemory
from resmem_ray.core.resmem import residuals, resmem_probs, softmax


QUESTION = ("Does an ImageNet-size memory (1.28M rows, 1000 classes) build and answer ResMem queries on one "
            "machine, and at what memory peak?")


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (Linux)."""
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}


class PeakMemory:
    """Samples the machine's memory in use (all processes: driver, Ray, actors)."""

    def __init__(self, every_s: float = 0.2):
        self.peak, self.every_s, self.stop = 0, every_s, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            m = meminfo()
            self.peak = max(self.peak, m["MemTotal"] - m["MemAvailable"])
            time.sleep(self.every_s)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def shard_rows(shard: int, rows: int, dim: int, classes: int, means: np.ndarray):
    rng = np.random.default_rng(100 + shard)
    labels = rng.integers(0, classes, rows)
    emb = means[labels] + rng.standard_normal((rows, dim), dtype=np.float32)
    logits = rng.standard_normal((rows, classes), dtype=np.float32) * 2
    logits[np.arange(rows), labels] += 4  # a model that is mostly right
    res = np.empty((rows, classes), np.float16)
    for s in range(0, rows, 65536):  # float64 softmax in slices, stored as float16
        res[s:s + 65536] = residuals(logits[s:s + 65536], labels[s:s + 65536])
    return prepare_queries(emb, "l2", True), labels, res


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_280_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--residual-dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args()
    means = np.random.default_rng(0).normal(size=(args.classes, args.dim)).astype(np.float32) * 0.5
    ray.init(include_dashboard=False, log_to_driver=False)
    bounds = np.linspace(0, args.rows, args.shards + 1).astype(int)
    cfg = IndexConfig(num_shards=1, factory="Flat", residual_dtype=args.residual_dtype,
                      cpus_per_shard=os.cpu_count() / args.shards)
    before = meminfo()["MemTotal"] - meminfo()["MemAvailable"]
    with tempfile.TemporaryDirectory(dir=".") as d, PeakMemory() as peak:
        t0 = time.perf_counter()
        manifest = None
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            emb, labels, res = shard_rows(s, b - a, args.dim, args.classes, means)
            part = write_shards(Path(d), emb, np.arange(a, b), labels, res, cfg, "l2", True, 1.0, first_shard=s)
            if manifest is None:
                manifest = part
            else:
                manifest["shards"] += part["shards"]
                manifest["rows"] += part["rows"]
            print(f"[build] shard {s}: {b - a:,} rows ({time.perf_counter() - t0:.0f}s)", flush=True)
            del emb, labels, res
        build_s = time.perf_counter() - t0
        files = sum(p.stat().st_size for p in Path(d).iterdir())
        rng = np.random.default_rng(1)
        qlabels = rng.integers(0, args.classes, args.queries)
        queries = prepare_queries(means[qlabels] + rng.normal(size=(args.queries, args.dim)).astype(np.float32),
                                  "l2", True)
        qlogits = rng.normal(size=(args.queries, args.classes)).astype(np.float32) * 2
        t0 = time.perf_counter()
        correct = 0
        with ShardedMemory(Path(d), manifest, cfg) as memory:
            start_s = time.perf_counter() - t0
            for s in range(0, args.queries, args.batch):
                nb = memory.search(queries[s:s + args.batch], args.k)
                probs = resmem_probs(softmax(qlogits[s:s + args.batch]), nb.residuals, nb.distances, 0.1)
                correct += int((probs.argmax(1) == qlabels[s:s + args.batch]).sum())
                print(f"[query] {s + args.batch:,}/{args.queries:,} ({time.perf_counter() - t0:.0f}s)", flush=True)
        query_s = time.perf_counter() - t0
    res_bytes = args.rows * args.classes * np.dtype(args.residual_dtype).itemsize
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    lines = section("ImageNet-size memory", QUESTION, "| quantity | value |", "| --- | ---: |",
             f"| memory | {args.rows:,} rows x {args.dim} dims, {args.classes} classes, {args.shards} exact shards |",
             f"| embeddings (float32) | {gib(args.rows * args.dim * 4)} |",
             f"| residuals ({args.residual_dtype}) | {gib(res_bytes)} (float32 would be "
             f"{gib(args.rows * args.classes * 4)}) |",
             f"| shard files on disk | {gib(files)} |",
             f"| build (generate + write {args.shards} shards) | {build_s:.0f} s |",
             f"| {args.queries:,} queries, k={args.k}, with ResMem correction | {query_s:.0f} s "
             f"({args.queries / query_s:.0f} q/s; actor start-up {start_s:.0f} s) |",
             f"| peak machine memory in use | {gib(peak.peak)} of {gib(meminfo()['MemTotal'])} (before the run: {gib(before)}) |",
             f"| ResMem accuracy on the synthetic queries (a sanity check) | {correct / args.queries:.3f} |")
    write(args.out, lines)


if __name__ == "__main__":
    main()
