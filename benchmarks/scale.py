"""How the suite's cost grows with the memory: synthetic memories of N rows through the
real stages, one `resmem run` per N (model.source=precomputed: train checks the files,
embed copies them into the run, index builds the shards, evaluate queries them).

    python benchmarks/scale.py --rows 1000000 10000000 30000000 --write-results

The memory is a Gaussian mixture with a known structure: 4,096 clusters in `--dim`
dimensions, each with one of 10 labels; the base "model" is a linear readout of the
labels fitted to the cluster centres, plus noise, so it gets about half the rows right
and the neighbours know the rest. Train has N rows (written as .npy, memory-mapped by the
reader), val and test 10,000 each. Per N: each stage's time, build rows/s, the peak
resident memory of the driver, of each shard build task and of each shard actor (sampled
every 0.2 s), bytes per row on disk and in the actors' RAM, the lookup rate, and against
exact search (faiss.knn over the train rows, in chunks) on 1,000 test queries: recall@k
and ResMem's accuracy with exact neighbours beside the run's. Writes the table, a
log-log plot (benchmarks/scale.png) and a projection to 100M and 1B rows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from results import section, write

QUESTION = ("How do build time, memory per row and lookup rate grow with the memory's size, and how many "
            "nodes does a memory of 100M or 1B rows need?")
CLUSTERS, CLASSES, HELD_OUT, SAMPLE, K = 4096, 10, 10_000, 1_000, 20
CHUNK = 1_000_000  # rows generated (and searched exactly) at a time


def mixture(dim: int, seed: int = 0):
    """The clusters' centres, their labels and the base model's readout: half of the
    clusters take the label the readout gives them, half a random one (only the memory
    knows those)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, dim)).astype(np.float32)
    readout = rng.standard_normal((dim, CLASSES)).astype(np.float32) / np.sqrt(dim)
    labels = np.where(rng.random(CLUSTERS) < 0.5, (centres @ readout).argmax(1), rng.integers(0, CLASSES, CLUSTERS))
    return centres, labels, readout


def rows(n: int, dim: int, seed: int, spread: float = 1.0):
    """n rows of the mixture: embeddings, the base model's logits (the readout, noisy), labels."""
    centres, labels, readout = mixture(dim)
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, CLUSTERS, n)
    emb = centres[cluster] + spread * rng.standard_normal((n, dim), dtype=np.float32)
    logits = 4 * (emb @ readout) + rng.standard_normal((n, CLASSES), dtype=np.float32)
    return emb, logits.astype(np.float32), labels[cluster]


def write_memory(folder: Path, n: int, dim: int) -> None:
    """train/ (n rows, .npy, written chunk by chunk), val/ and test/ (HELD_OUT rows each)."""
    from numpy.lib.format import open_memmap

    for split, size, seed in (("train", n, 1), ("val", HELD_OUT, 2), ("test", HELD_OUT, 3)):
        out = folder / split
        out.mkdir(parents=True)
        arrays = {"embedding": open_memmap(out / "embedding.npy", "w+", np.float32, (size, dim)),
                  "logits": open_memmap(out / "logits.npy", "w+", np.float32, (size, CLASSES)),
                  "label": open_memmap(out / "label.npy", "w+", np.int64, (size,))}
        for i, a in enumerate(range(0, size, CHUNK)):
            b = min(size, a + CHUNK)
            for name, values in zip(("embedding", "logits", "label"), rows(b - a, dim, seed * 10_000 + i)):
                arrays[name][a:b] = values
        for a in arrays.values():
            a.flush()


def _processes() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, command line, resident bytes), from /proc."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry.name}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
        found[int(entry.name)] = (ppid, cmd, rss)
    return found


class PeakMemory(threading.Thread):
    """The peak resident memory of a process and of its Ray workers by role, sampled."""

    ROLES = {"driver": None, "shard build task": "_build_shard", "shard actor": "ShardActor"}

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, {r: 0 for r in self.ROLES}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            procs, tree = _processes(), {self.pid}
            for pid, (ppid, _, _) in sorted(procs.items()):  # descendants (a parent's pid is smaller, mostly)
                if ppid in tree:
                    tree.add(pid)
            for pid in tree & procs.keys():
                _, cmd, rss = procs[pid]
                role = "driver" if pid == self.pid else next(
                    (r for r, tag in self.ROLES.items() if tag and tag in cmd), None)
                if role:
                    self.peak[role] = max(self.peak[role], rss)
            time.sleep(0.2)


def run_pipeline(source: Path, run_dir: Path, n: int, factory: str, shards: int) -> dict:
    cmd = [sys.executable, "-m", "resmem_ray.cli", "run", "--config", "jobs/configs/precomputed.yaml",
           f"model.path={source}", f"run_dir={run_dir}", f"index.factory={factory}", f"index.num_shards={shards}",
           f"index.cpus_per_shard={min(0.5, 1.5 / shards):.3f}",  # every shard actor fits on 2 cores
           "index.shards_per_actor=1", "index.nprobe=32", f"resmem.k={K}", "resmem.distance=l2",
           "resmem.normalize=false", "resmem.sigma=1.0", "evaluate.knn_ks=[1]", "embed.batch_size=65536"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    watch = PeakMemory(proc.pid)
    watch.start()
    out = proc.communicate()[0]
    watch.stop.set()
    watch.join()
    if proc.returncode:
        raise SystemExit(f"resmem run failed at N={n}:\n{out[-3000:]}")
    seconds = {name: float(t) for name, t in re.findall(r"== (\w+) done in ([\d.]+)s ==", out)}
    rate = re.findall(r"(\d+)/(\d+) queries \((\d+)/s\)", out)
    index_bytes = sum(p.stat().st_size for p in (run_dir / "index").glob("shard-*"))
    return {"seconds": {s: seconds[s] for s in ("train", "embed", "index", "evaluate")},
            "peak_rss": watch.peak, "index_bytes": index_bytes, "queries_per_s": int(rate[-1][2]) if rate else None}


def exact_check(source: Path, run_dir: Path, n: int) -> dict:
    """Recall@K of the run's neighbours (searched again in this process from its shards)
    and ResMem's accuracy with exact neighbours, on SAMPLE test queries."""
    import faiss
    import pyarrow.parquet as pq

    from resmem_ray.config import load_config
    from resmem_ray.core.resmem import confidence_gate, residuals, resmem_probs, softmax
    from resmem_ray.runtime.shards import LocalShards
    from resmem_ray.store.artifacts import load_index_manifest

    test = {c: np.load(source / "test" / f"{c}.npy")[:SAMPLE] for c in ("embedding", "logits", "label")}
    train_emb = np.load(source / "train" / "embedding.npy", mmap_mode="r")
    best_d = np.full((SAMPLE, K), np.inf, np.float32)
    best_i = np.zeros((SAMPLE, K), np.int64)
    for a in range(0, n, CHUNK):
        d, i = faiss.knn(test["embedding"], np.ascontiguousarray(train_emb[a:a + CHUNK]), K)
        d, i = np.concatenate([best_d, d], 1), np.concatenate([best_i, i + a], 1)
        order = np.argsort(d, axis=1, kind="stable")[:, :K]
        best_d, best_i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    cfg = load_config("jobs/configs/precomputed.yaml", (f"run_dir={run_dir}", "resmem.distance=l2",
                                                         "resmem.normalize=false", "resmem.sigma=1.0", f"resmem.k={K}"))
    manifest = load_index_manifest(run_dir / "index" / "manifest.json")
    shards = LocalShards(run_dir / "index", manifest["shards"], "l2", cfg.index)
    nb = shards.search(test["embedding"], K)
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(nb.ids, best_i)])  # ids: row numbers (train first)
    train_logits = np.load(source / "train" / "logits.npy", mmap_mode="r")
    train_labels = np.load(source / "train" / "label.npy", mmap_mode="r")
    r = cfg.resmem
    flat = best_i.ravel()
    exact_res = residuals(np.asarray(train_logits[flat]), np.asarray(train_labels[flat]), r.temperature)
    probs = softmax(test["logits"], r.temperature)
    gate = confidence_gate(probs, r.gate, r.gate_threshold, r.gate_softness)
    exact_pred = resmem_probs(probs, exact_res.reshape(SAMPLE, K, -1), np.sqrt(np.maximum(best_d, 0)), r.sigma,
                              gate).argmax(1)  # faiss.knn gives squared L2
    preds = pq.read_table(run_dir / "report" / "predictions.parquet", columns=["id", "base", "resmem"]).to_pydict()
    first_test = n + HELD_OUT  # ids are row numbers counted on across train, val, test
    sample = {i - first_test: (b, m) for i, b, m in zip(preds["id"], preds["base"], preds["resmem"])
              if i - first_test < SAMPLE}
    run_base = np.array([sample[j][0] for j in range(SAMPLE)])
    run_resmem = np.array([sample[j][1] for j in range(SAMPLE)])
    y = test["label"]
    return {"recall": float(recall), "base_acc": float((run_base == y).mean()),
            "resmem_acc": float((run_resmem == y).mean()), "exact_resmem_acc": float((exact_pred == y).mean())}


def factory_for(n: int) -> tuple[str, int]:
    """IVF with ~4 sqrt(rows per shard) lists; a shard per ~4M rows, at least 2."""
    shards = max(2, -(-n // 4_000_000))
    lists = int(2 ** round(np.log2(4 * np.sqrt(n / shards))))
    return f"IVF{lists},Flat", shards


def render(found: list[dict], dim: int) -> list[str]:
    lines = ["| rows | shards, index | train / embed / index / evaluate (s) | build rows/s | peak RSS: driver / "
             "build task / shard actor (GiB) | disk bytes/row | actor RAM bytes/row | lookups/s | recall@20 | "
             "accuracy: base / ResMem / ResMem exact (%) |", "|" + " ---: |" * 10]
    gib = 2 ** 30
    for f in found:
        s, p, e = f["seconds"], f["peak_rss"], f["exact"]
        lines.append(
            f"| {f['rows']:,} | {f['shards']}, {f['factory']} | {s['train']:.0f} / {s['embed']:.0f} / {s['index']:.0f} / "
            f"{s['evaluate']:.0f} | {f['rows'] / s['index']:,.0f} | {p['driver'] / gib:.2f} / "
            f"{p['shard build task'] / gib:.2f} / {p['shard actor'] / gib:.2f} | {f['index_bytes'] / f['rows']:.0f} | "
            f"{f['shards'] * p['shard actor'] / f['rows']:.0f} | {f['queries_per_s'] or 0:,} | {e['recall']:.3f} | "
            f"{100 * e['base_acc']:.1f} / {100 * e['resmem_acc']:.1f} / {100 * e['exact_resmem_acc']:.1f} |")
    last = found[-1]
    per_row = last["shards"] * last["peak_rss"]["shard actor"] / last["rows"]
    node_ram = 0.7 * 24 * gib  # a 24 GiB node, 70% of it for shard actors
    per_node = node_ram / per_row
    lines += ["", f"Memory of {dim}-dim float32 rows with 10-class dense residuals (float32). Actor RAM per row: "
              "the shard actors' peak resident memory (index, residual rows and each process's own libraries) over "
              "the rows they hold.", "",
              f"Projection from the largest run ({per_row:.0f} bytes per row in the actors): a 24 GiB node with 70% "
              f"of its memory for shard actors holds ~{per_node / 1e6:.0f}M rows, so 100M rows need "
              f"~{int(np.ceil(1e8 / per_node))} such nodes and 1B rows ~{int(np.ceil(1e9 / per_node))}; with PQ "
              "codes (e.g. 64 bytes per row, as kNN-LM keeps WikiText-103) and float16 residuals, about a quarter "
              "as many."]
    return lines


def plot(found: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [f["rows"] for f in found]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(n, [f["seconds"]["index"] for f in found], "o-", label="index build (s)")
    ax.loglog(n, [f["peak_rss"]["driver"] / 2**20 for f in found], "s-", label="driver peak RSS (MiB)")
    ax.loglog(n, [f["shards"] * f["peak_rss"]["shard actor"] / 2**20 for f in found], "^-",
              label="shard actors' RSS, all (MiB)")
    ax.set_xlabel("memory rows")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000, 30_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--work", default="/tmp/resmem_scale", help="scratch folder (emptied per N)")
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    work = Path(args.work)
    found = []
    for n in args.rows:
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.time()
        write_memory(work / "source", n, args.dim)
        factory, shards = factory_for(n)
        print(f"N={n:,}: data written in {time.time() - t0:.0f}s; {shards} x {factory}", flush=True)
        f = {"rows": n, "factory": factory, "shards": shards,
             **run_pipeline(work / "source", work / "run", n, factory, shards)}
        f["exact"] = exact_check(work / "source", work / "run", n)
        print(json.dumps(f), flush=True)
        found.append(f)
    shutil.rmtree(work, ignore_errors=True)
    table = render(found, args.dim)
    print("\n".join(table))
    if args.write_results:
        png = Path(__file__).with_name("scale.png")
        plot(found, png)
        lines = [*section("Memory size: from 1M rows up", QUESTION), *table, "", f"![cost against memory rows]({png.name})"]
        write(args.out, lines)


if __name__ == "__main__":
    main()
