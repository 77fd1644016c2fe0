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
and ResMem's accuracy with exact neighbours beside the run's. Then, on the same rows, a
compressed memory (PQ codes, int8 residual rows, the full-precision vectors kept on
disk): index and evaluate again (embed is current), once without and once with an exact
re-rank, each with its bytes per row, lookup rate, recall and ResMem accuracy. Writes the
tables, a log-log plot (benchmarks/scale.png) and a projection to 100M and 1B rows.
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
RERANK = 8  # the compressed memory's re-rank: RERANK x K candidates from the PQ codes
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

    ROLES = {"driver": None, "shard build task": "_build_planned_shard", "shard actor": "ShardActor"}

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, {r: 0 for r in self.ROLES}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            procs, tree, todo = _processes(), {self.pid}, [self.pid]
            children: dict[int, list[int]] = {}
            for pid, (ppid, _, _) in procs.items():
                children.setdefault(ppid, []).append(pid)
            while todo:  # descendants, whatever their pids (pids wrap around)
                for child in children.get(todo.pop(), []):
                    tree.add(child)
                    todo.append(child)
            for pid in tree & procs.keys():
                _, cmd, rss = procs[pid]
                role = "driver" if pid == self.pid else next(
                    (r for r, tag in self.ROLES.items() if tag and tag in cmd), None)
                if role:
                    self.peak[role] = max(self.peak[role], rss)
            time.sleep(0.2)


def settings(source: Path, run_dir: Path, factory: str, shards: int, extra: tuple = ()) -> list[str]:
    """The run's config overrides (shared by the pipeline and the exact check)."""
    return [f"model.path={source}", f"run_dir={run_dir}", f"index.factory={factory}", f"index.num_shards={shards}",
            f"index.cpus_per_shard={min(0.5, 1.5 / shards):.3f}",  # every shard actor fits on 2 cores
            "index.shards_per_actor=1", "index.nprobe=32", f"resmem.k={K}", "resmem.distance=l2",
            "resmem.normalize=false", "resmem.sigma=1.0", "evaluate.knn_ks=[1]", "embed.batch_size=65536", *extra]


def run_pipeline(overrides: list[str], n: int) -> dict:
    """`resmem run` with these overrides (stages already current are skipped), watched."""
    cmd = [sys.executable, "-m", "resmem_ray.cli", "run", "--config", "jobs/configs/precomputed.yaml", *overrides]
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
    rate = re.findall(r"test rows scored, (\d+) searched \((\d+) queries/s\)", out)
    run_dir = Path(next(o for o in overrides if o.startswith("run_dir=")).split("=", 1)[1])
    on_disk = {kind: sum(p.stat().st_size for p in (run_dir / "index").glob(f"shard-*{kind}"))
               for kind in (".faiss", ".npz", ".vectors.npy")}
    return {"seconds": seconds, "peak_rss": watch.peak, "index_bytes": on_disk[".faiss"] + on_disk[".npz"],
            "vectors_bytes": on_disk[".vectors.npy"], "queries_per_s": int(rate[-1][1]) if rate else None}


def exact_neighbours(source: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The K nearest train rows of the first SAMPLE test queries (squared L2, row numbers)."""
    import faiss

    queries = np.load(source / "test" / "embedding.npy")[:SAMPLE]
    train_emb = np.load(source / "train" / "embedding.npy", mmap_mode="r")
    best_d = np.full((SAMPLE, K), np.inf, np.float32)
    best_i = np.zeros((SAMPLE, K), np.int64)
    for a in range(0, n, CHUNK):
        d, i = faiss.knn(queries, np.ascontiguousarray(train_emb[a:a + CHUNK]), K)
        d, i = np.concatenate([best_d, d], 1), np.concatenate([best_i, i + a], 1)
        order = np.argsort(d, axis=1, kind="stable")[:, :K]
        best_d, best_i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    return best_d, best_i


def exact_check(source: Path, overrides: list[str], n: int, exact: tuple[np.ndarray, np.ndarray]) -> dict:
    """Recall@K of the run's neighbours (searched again in this process from its shards,
    with the run's search settings) and ResMem's accuracy with exact neighbours, on SAMPLE
    test queries."""
    import pyarrow.parquet as pq

    from resmem_ray.config import load_config
    from resmem_ray.core.resmem import confidence_gate, residuals, resmem_probs, softmax
    from resmem_ray.runtime.shards import LocalShards
    from resmem_ray.store.artifacts import load_index_manifest

    best_d, best_i = exact
    test = {c: np.load(source / "test" / f"{c}.npy")[:SAMPLE] for c in ("embedding", "logits", "label")}
    cfg = load_config("jobs/configs/precomputed.yaml", tuple(overrides))
    run_dir = Path(cfg.run_dir)
    manifest = load_index_manifest(run_dir / "index" / "manifest.json")
    shards = LocalShards(run_dir / "index", manifest["shards"], "l2", cfg.index)
    nb = shards.search(test["embedding"], K)
    del shards
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


def factory_for(n: int) -> tuple[int, int]:
    """IVF lists (~4 sqrt(rows per shard)) and shards (one per ~4M rows, at least 2)."""
    shards = max(2, -(-n // 4_000_000))
    return int(2 ** round(np.log2(4 * np.sqrt(n / shards)))), shards


def variants(lists: int, dim: int) -> list[tuple[str, str, tuple]]:
    """(name, factory, extra overrides) of each memory measured per N: IVF over float32
    vectors and residuals, then the compressed memory (PQ codes of dim / 4 bytes, int8
    residual rows, the full-precision vectors on disk), searched as it is and re-ranked."""
    squeezed = ("index.residual_dtype=int8", "index.keep_vectors=true")
    return [("IVF-Flat, float32 residuals", f"IVF{lists},Flat", ()),
            (f"IVF-PQ{dim // 4}, int8 residuals", f"IVF{lists},PQ{dim // 4}", squeezed),
            (f"IVF-PQ{dim // 4}, int8 residuals, re-rank {RERANK}x from disk", f"IVF{lists},PQ{dim // 4}",
             (*squeezed, f"index.rerank={RERANK}"))]


GIB = 2 ** 30


def actor_bytes(f: dict, v: dict) -> str:
    """The shard actors' resident bytes per memory row ("n/a" where no actor was sampled)."""
    peak = v["peak_rss"]["shard actor"]
    return f"{f['shards'] * peak / f['rows']:.0f}" if peak else "n/a"


def render(found: list[dict], dim: int) -> list[str]:
    lines = ["| rows | shards, index | train / embed / index / evaluate (s) | build rows/s | peak RSS: driver / "
             "build task / shard actor (GiB) | disk bytes/row | actor RAM bytes/row | lookups/s | recall@20 | "
             "accuracy: base / ResMem / ResMem exact (%) |", "|" + " ---: |" * 10]
    for f in found:
        v = f["variants"][0]
        s, p, e = v["seconds"], v["peak_rss"], v["exact"]
        lines.append(
            f"| {f['rows']:,} | {f['shards']}, {v['factory']} | {s['train']:.0f} / {s['embed']:.0f} / "
            f"{s['index']:.0f} / {s['evaluate']:.0f} | {f['rows'] / s['index']:,.0f} | {p['driver'] / GIB:.2f} / "
            f"{p['shard build task'] / GIB:.2f} / {p['shard actor'] / GIB:.2f} | {v['index_bytes'] / f['rows']:.0f} | "
            f"{f['shards'] * p['shard actor'] / f['rows']:.0f} | {v['queries_per_s'] or 0:,} | {e['recall']:.3f} | "
            f"{100 * e['base_acc']:.1f} / {100 * e['resmem_acc']:.1f} / {100 * e['exact_resmem_acc']:.1f} |")
    lines += ["", f"Memory of {dim}-dim float32 rows with 10-class dense residuals (float32), IVF-Flat shards. "
              "Actor RAM per row: the shard actors' peak resident memory (index, residual rows and each process's "
              "own libraries) over the rows they hold.", "",
              "The same rows as a compressed memory (index and evaluate again on the same run; accuracy on the "
              f"same {SAMPLE:,} test queries, against ResMem with exact neighbours and float32 residuals):", "",
              "| rows | memory | index build (s) | disk bytes/row: index + rows / vectors | actor RAM bytes/row | "
              "lookups/s | recall@20 | ResMem accuracy (%) | vs exact (points) |",
              "| ---: | --- |" + " ---: |" * 7]
    for f in found:
        for v in f["variants"]:
            e = v["exact"]
            build = v["seconds"].get("index")
            lines.append(
                f"| {f['rows']:,} | {v['name']} | {'' if build is None else f'{build:.0f}'} | "
                f"{v['index_bytes'] / f['rows']:.0f} / {v['vectors_bytes'] / f['rows']:.0f} | "
                f"{actor_bytes(f, v)} | {v['queries_per_s'] or 0:,} | {e['recall']:.3f} | {100 * e['resmem_acc']:.1f} | "
                f"{100 * (e['resmem_acc'] - e['exact_resmem_acc']):+.1f} |")
    if any(not v["peak_rss"]["shard actor"] for f in found for v in f["variants"]):
        lines += ["", "n/a: the sampler saw no shard actor process during that evaluate."]
    cut = [f"{f['rows']:,}" for f in found if len(f["variants"]) < len(found[0]["variants"])]
    if cut:
        lines += ["", f"At {', '.join(cut)} rows the run was stopped before the compressed memories were measured."]
    last = found[-1]
    lines.append("")
    for v in last["variants"][:2]:
        per_row = last["shards"] * v["peak_rss"]["shard actor"] / last["rows"]
        per_node = 0.7 * 24 * GIB / per_row  # a 24 GiB node, 70% of it for shard actors
        lines.append(f"Projection, {v['name']} (the largest run: {per_row:.0f} bytes per row in the actors): a 24 GiB "
                     f"node with 70% of its memory for shard actors holds ~{per_node / 1e6:.0f}M rows, so 100M rows "
                     f"need ~{int(np.ceil(1e8 / per_node))} such nodes and 1B rows ~{int(np.ceil(1e9 / per_node))}.")
    lines += ["", "Each actor's resident memory includes its own process (Python, numpy, FAISS, Ray: about 0.3 GiB), "
              "which a node pays once per actor, so the smaller memories' bytes per row are mostly that."]
    return lines


def plot(found: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [f["rows"] for f in found]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(n, [f["variants"][0]["seconds"]["index"] for f in found], "o-", label="index build, IVF-Flat (s)")
    ax.loglog(n, [f["variants"][0]["peak_rss"]["driver"] / 2**20 for f in found], "s-", label="driver peak RSS (MiB)")
    for v, mark in zip(range(2), "^v"):
        measured = [f for f in found if len(f["variants"]) > v]  # a stopped run lacks the last memories
        ax.loglog([f["rows"] for f in measured],
                  [f["shards"] * f["variants"][v]["peak_rss"]["shard actor"] / 2**20 for f in measured], mark + "-",
                  label=f"shard actors' RSS, all (MiB): {found[0]['variants'][v]['name']}")
    ax.set_xlabel("memory rows")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replayed(log: Path) -> list[dict]:
    """What a run found, from the lines it printed (its N lines and one JSON line a memory)."""
    found = []
    for line in log.read_text().splitlines():
        head = re.match(r"N=([\d,]+): .*; (\d+) shards", line)
        if head:
            found.append({"rows": int(head[1].replace(",", "")), "shards": int(head[2]), "variants": []})
        elif line.startswith("{"):
            found[-1]["variants"].append(json.loads(line))
    return [f for f in found if f["variants"]]  # a size the run did not finish is left out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000, 30_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--work", default="/tmp/resmem_scale", help="scratch folder (emptied per N)")
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    parser.add_argument("--replay", metavar="LOG", help="render the tables from a run's printed lines instead")
    args = parser.parse_args(argv)
    work = Path(args.work)
    found = replayed(Path(args.replay)) if args.replay else []
    for n in [] if args.replay else args.rows:
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.time()
        write_memory(work / "source", n, args.dim)
        lists, shards = factory_for(n)
        print(f"N={n:,}: data written in {time.time() - t0:.0f}s; {shards} shards, IVF{lists}", flush=True)
        exact = exact_neighbours(work / "source", n)
        f = {"rows": n, "shards": shards, "variants": []}
        for name, factory, extra in variants(lists, args.dim):
            overrides = settings(work / "source", work / "run", factory, shards, extra)
            v = {"name": name, "factory": factory, **run_pipeline(overrides, n)}
            v["exact"] = exact_check(work / "source", overrides, n, exact)
            print(json.dumps(v), flush=True)
            f["variants"].append(v)
        found.append(f)
    if not args.replay:
        shutil.rmtree(work, ignore_errors=True)
    table = render(found, args.dim)
    print("\n".join(table))
    if args.write_results:
        png = Path(__file__).with_name("scale.png")
        plot(found, png)
        intro = []
        if args.replay:  # the section names the run's command, and says it was rendered again
            sys.argv = [sys.argv[0], "--rows", *(str(f["rows"]) for f in found), "--write-results"]
            intro = ["The tables were rendered again from this run's printed lines (`--replay`).", ""]
        lines = [*section("Memory size: from 1M rows up", QUESTION, *intro), *table, "",
                 f"![cost against memory rows]({png.name})"]
        write(args.out, lines)


if __name__ == "__main__":
    main()
