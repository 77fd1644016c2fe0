"""A token memory of k-means cells: how much of the exact memory's perplexity gain does it
keep, on val and on test, and what does a token's read cost?

The datastore clustering of Efficient kNN-LM (He et al. 2021), applied to ResMem: the
memory's rows (a finished token-LM run's index, read back as lm_throughput.py does) are
clustered with FAISS k-means into C cells; each cell keeps its row count n_c and the mean
residual of its rows as one dense vocabulary row. A token reads its j nearest cells:

    q = p + gate * sum_c w_c rbar_c,   w_c proportional to n_c * exp(-(d_c - d_min) / sigma)

then the clip and renormalisation every token memory uses (core/sparse.py). j = 1 is the
nearest cell's mean. sigma and gate are chosen on val per (C, j); test is scored once at
that choice. The exact rows: the run's tuned ResMem (tune's val perplexity, evaluate's
test perplexity). Time per token: the centroid search and the correction, in turns, on
the val tokens in batches of 4,096.

    python benchmarks/lm_cells.py --config jobs/configs/bbc_lm.yaml run_dir=runs/bbc_lm/seed0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from lm_throughput import memory  # noqa: E402
from results import section, write  # noqa: E402

from resmem_ray.config import load_config  # noqa: E402
from resmem_ray.core.knn import unpack_residuals  # noqa: E402
from resmem_ray.core.resmem import softmax  # noqa: E402
from resmem_ray.core.sparse import clip_renormalise, token_metrics  # noqa: E402
from resmem_ray.store.artifacts import read_split  # noqa: E402
from resmem_ray.store.rundir import RunDir  # noqa: E402

QUESTION = ("How much of the exact token memory's perplexity gain does a memory of k-means cells (count and mean "
            "residual each) keep on val and on test, and what does a token's read cost?")
SIGMAS = (0.3, 1.0, 3.0, 10.0, 30.0)
GATES = (0.2, 0.35, 0.5, 0.75, 1.0)


def cells(vectors: np.ndarray, rows: dict, vocab: int, C: int, seed: int):
    """k-means centroids (a Flat index), each cell's row count and mean residual (C, V)."""
    km = faiss.Kmeans(vectors.shape[1], C, niter=20, seed=seed, max_points_per_centroid=256)
    km.train(vectors)
    _, a = km.index.search(vectors, 1)
    a = a[:, 0]
    count = np.bincount(a, minlength=C).astype(np.float64)
    m = rows["residual_ids"].shape[1]
    total = np.bincount(a * vocab + rows["labels"], minlength=C * vocab).astype(np.float64)
    total -= np.bincount((np.repeat(a, m) * vocab + rows["residual_ids"].ravel()),
                         weights=unpack_residuals(rows, np.arange(len(a))).astype(np.float64).ravel(),
                         minlength=C * vocab)
    return km.index, count, (total.reshape(C, vocab) / np.maximum(count, 1)[:, None]).astype(np.float32)


def read(p: np.ndarray, d: np.ndarray, near: np.ndarray, count: np.ndarray, mean: np.ndarray, sigma: float,
         gate: float, floor: float) -> np.ndarray:
    """Corrected distributions from each token's j nearest cells."""
    w = count[near] * np.exp(-(d - d[:, :1]) / sigma) if near.shape[1] > 1 else np.ones(near.shape)
    w /= w.sum(1, keepdims=True)
    correction = np.einsum("nj,njv->nv", w, mean[near], dtype=np.float64)
    return clip_renormalise(p + gate * correction, p, floor)


def perplexity(split: dict, found, count, mean, sigma, gate, floor, batch: int = 2048) -> float:
    d, near = found
    totals = np.zeros(3)
    for s in range(0, len(split["label"]), batch):
        sl = slice(s, s + batch)
        q = read(split["p"][sl], d[sl], near[sl], count, mean, sigma, gate, floor)
        totals += token_metrics(q, split["label"][sl])
    return float(np.exp(totals[1] / totals[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="jobs/configs/bbc_lm.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. run_dir=runs/bbc_lm/seed0")
    parser.add_argument("--cells", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--reads", type=int, nargs="+", default=[1, 4, 16], help="cells a token reads (j)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args()
    cfg = load_config(args.config, tuple(args.overrides))
    run = RunDir(cfg.run_dir)
    faiss.omp_set_num_threads(args.threads)
    vectors, rows, manifest = memory(run)
    if manifest["distance"] != "sqeuclidean" or manifest["normalize"]:
        raise SystemExit(f"{run.index}: cells are measured on squared L2 of raw states; the index is "
                         f"{manifest['distance']}{', normalised' if manifest['normalize'] else ''}")
    vocab, floor = manifest["num_classes"], cfg.text.prob_floor
    splits = {s: read_split(run, s, "benchmark", ("id", "label", "embedding", "logits")) for s in ("val", "test")}
    for s in splits.values():
        s["p"] = softmax(s.pop("logits"), cfg.resmem.temperature)
    base = {}
    for name, s in splits.items():
        _, nll, n = token_metrics(s["p"], s["label"])
        base[name] = float(np.exp(nll / n))
    tuned = json.loads((run.root / "tune" / "best.json").read_text())
    exact = {"val": next(r["val_perplexity"] for r in tuned["best_per_k"] if r["k"] == tuned["best"]["k"]),
             "test": json.loads((run.report / "metrics.json").read_text())["resmem_perplexity"]}
    print(f"memory {vectors.shape[0]:,} x {vectors.shape[1]}; base {base}; exact ResMem {exact}", flush=True)
    table = []
    for C in args.cells:
        t0 = time.perf_counter()
        index, count, mean = cells(vectors, rows, vocab, C, cfg.seed)
        print(f"{C} cells built in {time.perf_counter() - t0:.0f} s", flush=True)
        for j in args.reads:
            found = {name: index.search(s["embedding"].astype(np.float32), j) for name, s in splits.items()}
            grid = [(sigma, gate) for sigma in (SIGMAS if j > 1 else (1.0,)) for gate in GATES]
            scores = {sg: perplexity(splits["val"], found["val"], count, mean, *sg, floor) for sg in grid}
            sigma, gate = min(scores, key=scores.get)
            test = perplexity(splits["test"], found["test"], count, mean, sigma, gate, floor)
            val = splits["val"]
            times = {"search": [], "correction": []}
            for _ in range(3):  # best of 3, on the first 4,096 val tokens
                q = val["embedding"][:4096].astype(np.float32)
                t0 = time.perf_counter()
                d, near = index.search(q, j)
                t1 = time.perf_counter()
                read(val["p"][:4096], d, near, count, mean, sigma, gate, floor)
                t2 = time.perf_counter()
                times["search"].append(t1 - t0)
                times["correction"].append(t2 - t1)
            us = {part: 1e6 * min(t) / len(q) for part, t in times.items()}
            kept = {s: (base[s] - v) / (base[s] - exact[s]) for s, v in (("val", scores[sigma, gate]), ("test", test))}
            shown = f"{sigma:g}" if j > 1 else "-"  # one cell read: its weight is 1 at any sigma
            table.append(f"| {C:,} | {j} | {shown} | {gate:g} | {scores[sigma, gate]:.2f} | {100 * kept['val']:.0f}% | "
                         f"{test:.2f} | {100 * kept['test']:.0f}% | {us['search']:.1f} / {us['correction']:.1f} |")
            print(table[-1], flush=True)
    lines = section("Token memory of k-means cells", QUESTION,
                    f"{run.root.name}: memory {vectors.shape[0]:,} x {vectors.shape[1]} (squared L2, raw), "
                    f"vocabulary {vocab:,}; {len(splits['val']['label']):,} val and {len(splits['test']['label']):,} "
                    f"test tokens; CPU, {args.threads} threads. Base perplexity: val {base['val']:.2f}, test "
                    f"{base['test']:.2f}. The exact memory (tuned ResMem, k={tuned['best']['k']}): val "
                    f"{exact['val']:.2f}, test {exact['test']:.2f}. Gain kept: the share of the exact memory's "
                    "perplexity gain over the base model, on the same split. Sigma and gate chosen on val.", "",
                    "| cells | cells read | sigma | gate | val perplexity | val gain kept | test perplexity | "
                    "test gain kept | us/token: search / correction |",
                    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *table)
    write(args.out, lines)


if __name__ == "__main__":
    main()
