"""What separates ResMem from the textbook kNN-LM on a token LM, on the same neighbours: a
finished run that `resmem tune` tuned (both methods over the same space), its val split,
one exact FAISS search of the memory tune chose.

Before its clip and renormalisation, ResMem at gate = lambda, sigma = tau and kNN-LM's k is

    resmem = p + lambda * (p_kNN - sum_i w_i p~_i)      kNN-LM = p + lambda * (p_kNN - p)

(p~_i a neighbour's stored top-m distribution), so the two differ only in what is taken
away: the neighbours' own predictions against the query's. This measures how far apart
those two are and what each scores, beside both methods as tuned.

    python benchmarks/lm_rivals.py --config jobs/configs/bbc_lm.yaml --run runs/bbc_lm/seed0 --write-results

docs/results.md's LM section (benchmarks/results_doc.py) records the same figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from results import section, write  # noqa: E402

from resmem_ray.config import load_config  # noqa: E402
from resmem_ray.core.knn import faiss_metric, prepare_queries, to_distance  # noqa: E402
from resmem_ray.core.resmem import kernel_weights, knn_interpolation, softmax  # noqa: E402
from resmem_ray.core.sparse import clip_renormalise, corrected_probs  # noqa: E402
from resmem_ray.store.artifacts import read_split  # noqa: E402
from resmem_ray.stages.tune import memory_key  # noqa: E402
from resmem_ray.store.rundir import RunDir  # noqa: E402
from resmem_ray.tasks.text import load_text_model  # noqa: E402

QUESTION = ("Tuned over the same space, what separates ResMem from the textbook kNN-LM on the same neighbours "
            "of a token LM?")


def perplexity(logq: np.ndarray) -> float:
    """From each token's log-probability of its true next token."""
    return float(np.exp(-logq.mean()))


def label_logprob(q: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.log(q[np.arange(len(y)), y])


def dense_rows(cfg, run: RunDir, best: dict, train: dict, ids: np.ndarray, d: np.ndarray, p: np.ndarray,
               y: np.ndarray, tokens: int, batch: int = 16) -> dict:
    """ResMem as tuned with dense residual rows, on the first `tokens` val tokens (each
    token's log-probability of its true next token): with text.lm_embedding=final a memory
    row's embedding is the final hidden state GPT-2's tied head reads, so its whole
    distribution is softmax(h W^T / T) again. Also how far the neighbours' weighted whole
    distributions lie from the query's own p."""
    if cfg.text.lm_embedding != "final":
        return {}
    model, _, _ = load_text_model(run)
    head = model.get_output_embeddings().weight.detach().float().numpy()  # (V, d)
    k, T, floor = best["k"], cfg.resmem.temperature, cfg.text.prob_floor
    logq, apart, on_label = [], [], {"theirs": [], "own": []}
    for s in range(0, tokens, batch):
        sl, i = slice(s, min(s + batch, tokens)), ids[s:min(s + batch, tokens), :k]
        n = len(i)
        w = kernel_weights(d[sl, :k], best["sigma"])
        taken = np.einsum("nk,nkv->nv", w, softmax(train["embedding"][i.ravel()] @ head.T, T).reshape(n, k, -1))
        apart.append(0.5 * np.abs(p[sl] - taken).sum(1))
        on_label["theirs"].append(taken[np.arange(n), y[sl]])
        on_label["own"].append(p[sl][np.arange(n), y[sl]])
        votes = np.zeros_like(taken)  # sum_i w_i onehot(y_i)
        np.add.at(votes, (np.repeat(np.arange(n), k), train["label"][i.ravel()]), w.ravel())
        logq.append(label_logprob(clip_renormalise(p[sl] + best["gate"] * (votes - taken), p[sl], floor), y[sl]))
    return {"logq": np.concatenate(logq), "apart_dense": float(np.concatenate(apart).mean()),
            **{f"label_{key}": float(np.concatenate(v).mean()) for key, v in on_label.items()}}


def separation(config: str, run_dir: str, batch: int = 512, dense_tokens: int | None = None) -> dict:
    """On a tuned run's val split at the memory and settings tune chose: the base model,
    kNN-LM and ResMem as tuned, and ResMem at kNN-LM's k, kernel and weight, from one exact
    search; how far the neighbours' weighted predictions lie from the query's own; ResMem
    with dense rows beside its top-m rows and kNN-LM on the first `dense_tokens` (None: all)."""
    cfg = load_config(config, (f"run_dir={run_dir}",))
    run = RunDir(cfg.run_dir)
    best = json.loads((run.root / "tune" / "best.json").read_text())["best"]
    train = read_split(run, "train", "benchmark", columns=("id", "label", "embedding", "top_ids", "top_probs"))
    val = read_split(run, "val", "benchmark", columns=("id", "label", "embedding", "logits"))
    distance, normalize, k = best["distance"], best["normalize"], max(best["k"], best["knn_k"])
    index = faiss.IndexFlat(train["embedding"].shape[1], faiss_metric(distance))
    index.add(prepare_queries(train["embedding"], distance, normalize))
    raw, ids = index.search(prepare_queries(val["embedding"], distance, normalize), k)
    d, y, vocab = to_distance(raw, distance), val["label"], val["logits"].shape[1]
    p = softmax(val["logits"], cfg.resmem.temperature)
    lam, tau, kk, floor = best["knn_lambda"], best["knn_tau"], best["knn_k"], cfg.text.prob_floor
    parts = {"knn": [], "resmem": [], "resmem_at_knn": [], "apart": [], "missing": []}
    for s in range(0, len(y), batch):
        sl, i = slice(s, s + batch), ids[s:s + batch]
        labels, top_ids, top_probs = train["label"][i], train["top_ids"][i], train["top_probs"][i]
        parts["knn"].append(label_logprob(knn_interpolation(p[sl], labels[:, :kk], d[sl, :kk], lam, tau), y[sl]))
        w = kernel_weights(d[sl, :best["k"]], best["sigma"])
        parts["resmem"].append(label_logprob(corrected_probs(p[sl], w, labels[:, :best["k"]], top_ids[:, :best["k"]],
                                                             top_probs[:, :best["k"]], best["gate"], floor), y[sl]))
        w = kernel_weights(d[sl, :kk], tau)
        parts["resmem_at_knn"].append(label_logprob(corrected_probs(p[sl], w, labels[:, :kk], top_ids[:, :kk],
                                                                    top_probs[:, :kk], lam, floor), y[sl]))
        # what ResMem takes away (the neighbours' stored predictions) against kNN-LM's (the query's own p)
        start = np.arange(len(w))[:, None, None] * vocab
        taken = np.bincount((top_ids[:, :kk] + start).ravel(), weights=(top_probs[:, :kk] * w[:, :, None]).ravel(),
                            minlength=len(w) * vocab).reshape(len(w), vocab)
        parts["apart"].append(0.5 * np.abs(p[sl] - taken).sum(1))
        parts["missing"].append(1 - top_probs[:, :kk].astype(np.float64).sum(2).mean(1))
    q = {key: np.concatenate(v) for key, v in parts.items()}
    tokens = dense_tokens or len(y)
    dense = dense_rows(cfg, run, best, train, ids, d, p, y, tokens)
    if dense:  # the same tokens, scored by the arrays above
        dense = {"dense_tokens": tokens, "dense_rows": perplexity(dense.pop("logq")),
                 "sparse_rows": perplexity(q["resmem"][:tokens]), "knn_rows": perplexity(q["knn"][:tokens]), **dense}
    return {**dense, "val_tokens": len(y), "distance": distance, "normalize": normalize, "k": k, "best": best,
            "top_m": int(train["top_ids"].shape[1]), "base": perplexity(label_logprob(p, y)),
            **{key: perplexity(q[key]) for key in ("knn", "resmem", "resmem_at_knn")},
            "apart_mean": float(q["apart"].mean()), "apart_median": float(np.median(q["apart"])),
            "missing_mass": float(q["missing"].mean())}


def separation_lines(f: dict) -> list[str]:
    b = f["best"]
    memory = memory_key(f["distance"], f["normalize"])
    return [f"{f['val_tokens']:,} val tokens, the memory `resmem tune` chose ({memory}) and its settings; one exact "
            f"search at k={f['k']}.", "",
            "| scored on the same neighbours | val perplexity |", "| --- | ---: |",
            f"| base model | {f['base']:.2f} |",
            f"| kNN-LM as tuned: p + lambda (p_kNN - p); k={b['knn_k']}, lambda={b['knn_lambda']:g}, "
            f"tau={b['knn_tau']:g} | {f['knn']:.2f} |",
            f"| ResMem as tuned: k={b['k']}, sigma={b['sigma']:g}, gate={b['gate']:g} | {f['resmem']:.2f} |",
            f"| ResMem at kNN-LM's k, kernel and weight: p + lambda (p_kNN - sum_i w_i p~_i) | "
            f"{f['resmem_at_knn']:.2f} |", "",
            f"There, what ResMem subtracts (the neighbours' weighted top-{f['top_m']} predictions) lies a "
            f"total-variation distance of {f['apart_mean']:.3f} on average (median {f['apart_median']:.3f}) from "
            f"what kNN-LM subtracts (the query's own p); the top-{f['top_m']} rows leave out "
            f"{100 * f['missing_mass']:.1f}% of a neighbour's probability mass on average."] + ([
            "", f"On {'the same' if f['dense_tokens'] == f['val_tokens'] else 'the first'} {f['dense_tokens']:,} "
            "val tokens, ResMem as tuned with dense residual rows (each "
            f"neighbour's whole distribution, recomputed from its final hidden state): perplexity "
            f"{f['dense_rows']:.2f}, against {f['sparse_rows']:.2f} with the top-{f['top_m']} rows and "
            f"{f['knn_rows']:.2f} for kNN-LM as tuned. There the neighbours' weighted whole distributions lie a "
            f"total-variation distance of {f['apart_dense']:.3f} on average from the query's own p, but give the "
            f"query's true next token {f['label_theirs']:.4f} on average against the query's own "
            f"{f['label_own']:.4f}."]
            if "dense_rows" in f else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="jobs/configs/bbc_lm.yaml")
    parser.add_argument("--run", default="runs/bbc_lm/seed0", help="a run `resmem tune` has tuned")
    parser.add_argument("--dense-tokens", type=int, help="val tokens scored with dense rows (default: all)")
    parser.add_argument("--write-results", action="store_true", help="replace this script's section of RESULTS.md")
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args()
    t0 = time.time()
    found = separation(args.config, args.run, dense_tokens=args.dense_tokens)
    lines = section("Token LM: what separates ResMem from kNN-LM", QUESTION, *separation_lines(found), "",
                    f"{time.time() - t0:.0f} s.")
    if args.write_results:
        write(args.out, lines)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
