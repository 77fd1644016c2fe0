"""The token memory's cost: next-token distributions per second of the plain LM against
the LM with ResMem lookups, over a finished token-LM run's test split, in one process.

Both read the same pre-tokenised batches of test texts and end with a next-token
distribution for every position: the plain LM's softmax, or ResMem's corrected one
(tasks/lm.py corrected_token_probs). Per sequence batch, ResMem does one forward (with
hidden states), one batched search of the tokens that read the memory, one fetch of their
neighbours' sparse rows and the correction. With a `resmem tune` summary in the run, its
chosen setting (memory, k, sigma, gate) is the starting point, and a smaller k runs at
tune's best sigma and gate for that k (best.json's best_per_k). Each setting is a memory
index (the run's memory rows re-indexed with a FAISS factory and nprobe, as `resmem index`
with index.factory / index.nprobe builds it: IVF, PCA to fewer dimensions, fast-scan PQ
codes; or the torch_lowp backend), k, how many of each neighbour's top-m entries it reads
(a memory embedded with a smaller text.top_m), and which tokens read the memory: every one,
those under a confidence threshold (resmem.gate_threshold), or those the learned retrieval
gate (`resmem tune`) opens at a cut-off. Perplexity, the share of the perplexity gain kept,
next-token accuracy, the fraction of tokens that read the memory and where the time went
(model, gate, search, correction) sit beside its tokens/s. Each pass of a setting sits beside
a pass of the plain LM (before it in one turn, after it in the next), in turns over the
settings, --repeats times: "vs plain" is the median of those pairs' ratios (a setting under
0.25x after its first pair is timed once), tokens/s the best pass.

    python benchmarks/lm_throughput.py --config jobs/configs/bbc_lm.yaml run_dir=runs/bbc_lm [--device cuda]

Writes its section of benchmarks/RESULTS.md (--variant: a section of its own).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import section, write  # noqa: E402

from resmem_ray.config import load_config  # noqa: E402
from resmem_ray.core.gates import retrieval_features, retrieval_gate  # noqa: E402
from resmem_ray.core.knn import build_shard, place_index, prepare_queries, search_shard, set_search_params  # noqa: E402
from resmem_ray.core.resmem import softmax  # noqa: E402
from resmem_ray.core.sparse import token_metrics  # noqa: E402
from resmem_ray.errors import ResMemError  # noqa: E402
from resmem_ray.stages.tune import with_setting  # noqa: E402
from resmem_ray.store.artifacts import load_shard, read_index_manifest  # noqa: E402
from resmem_ray.store.rundir import RunDir  # noqa: E402
from resmem_ray.tasks.lm import corrected_token_probs, logits_and_states, open_gate  # noqa: E402
from resmem_ray.tasks.registry import task_for  # noqa: E402
from resmem_ray.tasks.text import load_text_model, tokenize_batch  # noqa: E402

# (factory, nprobe, which tokens read the memory, resmem.k (None: the run's), top-m (None: the
# memory's), search backend): the run's exact memory, then the levers. {half}, {quarter}: that
# share of the memory's dimension. Which tokens: ("all", None); ("confidence",
# resmem.gate_threshold); ("retrieval", share of val tokens): the learned retrieval gate
# `resmem tune` fitted, at its cut-off that opened that share of val. Top-m: each neighbour's
# first m entries, what a memory embedded with text.top_m=m holds (rows are most likely first).
ALL = ("all", None)
SETTINGS = [("Flat", 0, ALL, None, None, "faiss"), ("IVF1024,Flat", 8, ALL, None, None, "faiss"),
            ("IVF1024,Flat", 4, ALL, None, None, "faiss"), ("PCA{half},IVF1024,Flat", 8, ALL, None, None, "faiss"),
            ("PCA{quarter},IVF1024,Flat", 8, ALL, None, None, "faiss"),
            ("IVF1024,Flat", 8, ALL, None, 8, "faiss"), ("PCA{half},IVF1024,Flat", 8, ALL, None, 8, "faiss"),
            ("PCA{quarter},IVF1024,Flat", 8, ALL, None, 8, "faiss"),
            ("IVF1024,Flat", 8, ALL, 256, None, "faiss"), ("IVF1024,Flat", 8, ALL, 64, None, "faiss"),
            ("Flat", 0, ALL, 64, None, "torch_lowp"), ("PCA64,IVF1024,Flat", 8, ALL, 64, None, "faiss"),
            ("PCA32,IVF1024,Flat", 8, ALL, 64, None, "faiss"), ("IVF1024,PQ32x4fs", 8, ALL, 64, None, "faiss"),
            ("IVF1024,Flat", 2, ALL, 16, None, "faiss"), ("IVF1024,Flat", 1, ALL, 16, None, "faiss"),
            ("PCA32,IVF1024,Flat", 1, ALL, 16, None, "faiss"),
            ("IVF1024,Flat", 2, ("confidence", 0.03), 16, None, "faiss"),
            *[("IVF1024,Flat", 2, ("retrieval", share), 16, None, "faiss") for share in (0.5, 0.25, 0.1)]]


QUESTION = ("What does the token memory cost in tokens/s against the plain LM, and how much do an approximate "
            "index and the confidence gate buy back?")


def test_batches(cfg, run: RunDir, meta: dict, batch: int, device: str, texts: int | None) -> list[dict]:
    """The test split's texts (the first `texts`, None: all) tokenised as `resmem embed`
    does, in batches of sequences."""
    splits, _ = task_for(cfg).load_splits(cfg)
    test = splits["test"]
    out, n = [], min(len(test), texts or len(test))
    for s in range(0, n, batch):
        sl = slice(s, min(s + batch, n))
        enc = tokenize_batch({"id": test.ids[sl], "label": test.labels[sl], "text": np.array(test.texts[sl], dtype=object)},
                             str(run.model), meta["max_length"])
        ids, mask = enc["input_ids"], enc["attention_mask"]
        rows, pos = np.nonzero(mask[:, 1:])  # positions whose next token is real
        out.append({"input_ids": torch.tensor(ids, device=device), "attention_mask": torch.tensor(mask, device=device),
                    "rows": torch.tensor(rows, device=device), "pos": torch.tensor(pos, device=device),
                    "labels": ids[rows, pos + 1]})
    return out


def memory(run: RunDir) -> tuple[np.ndarray, dict, dict]:
    """The run's memory: its vectors (as indexed) and rows, from the index shards."""
    manifest = read_index_manifest(run, needed_by="benchmark")
    if manifest.get("codec") != "sparse":
        raise ResMemError(f"{run.index} is not a token memory (sparse codec): run a model.name=gpt2_lm config")
    vectors, parts = [], []
    for entry in manifest["shards"]:
        index, rows = load_shard(run.index, entry)
        if not isinstance(faiss.downcast_index(index), faiss.IndexFlat):
            raise ResMemError(f"the run's index is {manifest['factory']!r}: this benchmark reads the vectors "
                              "back from an exact one (index.factory=Flat)")
        vectors.append(index.reconstruct_n(0, index.ntotal))
        parts.append(rows)
    rows = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return np.concatenate(vectors), rows, manifest


def plain(model, b: dict, clock: dict) -> tuple[np.ndarray, int]:
    with timed(clock, "model"), torch.inference_mode():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[b["rows"], b["pos"]]
        p = softmax(logits.float().cpu().numpy())
    return p, 0


def with_memory(model, b: dict, index, rows: dict, cfg, layer: str, nprobe: int, clock: dict,
                opens=None) -> tuple[np.ndarray, int]:
    """ResMem's distributions for a batch and how many tokens read the memory. `opens(p,
    hidden)`: the tokens the retrieval gate opens (None: the confidence gate alone decides).
    `clock` adds up the seconds of each part: model (forward and softmax), gate, search
    (with the neighbours' rows), correction."""
    if isinstance(index, faiss.Index):
        set_search_params(index, nprobe, cfg.index.ef_search)
    r = cfg.resmem
    with timed(clock, "model"), torch.inference_mode():
        logits, hidden = logits_and_states(model, b["input_ids"], b["attention_mask"], (b["rows"], b["pos"]), layer)
        hidden = hidden.float().cpu().numpy()
        p = softmax(logits.float().cpu().numpy(), r.temperature)
    with timed(clock, "gate"):
        g = open_gate(p, r)
        if opens is not None:
            g = np.where(opens(p, hidden), g, 0.0)
        found = g > 0
    if not found.any():
        return p, 0
    with timed(clock, "search"):
        queries = prepare_queries(hidden[found], r.distance, r.normalize)
        dist, _, labels, residuals, residual_ids = search_shard(index, rows, queries, r.k, r.distance)
    with timed(clock, "correction"):
        q = corrected_token_probs(p, g, dist, labels, residual_ids, residuals, cfg)
    return q, int(found.sum())


def parts(run: dict) -> str:
    """A row's microseconds per token: model / gate / search / correction."""
    return " / ".join(f"{run['parts'].get(part, 0.0):.1f}" for part in ("model", "gate", "search", "correction"))


@contextmanager
def timed(clock: dict, part: str):
    t0 = time.perf_counter()
    yield
    clock[part] = clock.get(part, 0.0) + time.perf_counter() - t0


def retrieval_opens(gate: dict, share: float):
    """The learned retrieval gate at the cut-off that opened `share` of val's tokens."""
    row = min(gate["val"], key=lambda row: abs(row["searched"] - share))
    if abs(row["searched"] - share) > 0.02:
        raise ResMemError(f"the retrieval gate has no cut-off for {share:.0%} of val tokens: "
                          f"{[round(row['searched'], 3) for row in gate['val']]}")
    cutoff = row["cutoff"]
    return lambda p, hidden: retrieval_gate(gate, retrieval_features(p, np.linalg.norm(hidden, axis=1))) >= cutoff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="jobs/configs/bbc_lm.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. run_dir=runs/bbc_lm")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the LM; Flat search then on the torch backend)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per forward and per search")
    parser.add_argument("--texts", type=int, help="only the first N test texts (a large model on a small machine)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=6, help="pairs per setting, half of them each way round")
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    parser.add_argument("--variant", default="", help="a name for this run's own section (e.g. a larger LM)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    cfg = load_config(args.config, tuple(args.overrides))
    run = RunDir(cfg.run_dir)
    tuned = run.root / "tune" / "best.json"
    summary = json.loads(tuned.read_text()) if tuned.is_file() else {}
    if summary:  # the setting `resmem tune` chose (its memory is the index it left)
        cfg = with_setting(cfg, summary["best"])
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    model, _, meta = load_text_model(run)
    model = model.to(args.device)
    batches = test_batches(cfg, run, meta, args.batch, args.device, args.texts)
    tokens = sum(len(b["labels"]) for b in batches)
    vectors, rows, manifest = memory(run)
    layer = cfg.text.lm_embedding
    print(f"{tokens} test tokens in {len(batches)} batches; memory {vectors.shape[0]} x {vectors.shape[1]}",
          flush=True)

    runs = [{"setting": "plain LM", "fn": lambda b, clock: plain(model, b, clock)}]
    per_k = {row["k"]: row for row in summary.get("best_per_k", [])}  # tune's best kernel at each k
    indices, seen = {}, set()
    for factory, nprobe, (reader, value), k, top_m, backend in SETTINGS:
        factory = factory.format(half=vectors.shape[1] // 2, quarter=vectors.shape[1] // 4)
        if reader == "retrieval" and "retrieval_gate" not in summary:
            print(f"skipping the retrieval gate at {value:.0%}: {tuned} holds none (`resmem tune` fits it)")
            continue
        if (factory, backend) not in indices:
            t0 = time.perf_counter()
            index = build_shard(vectors, factory, manifest["distance"], cfg.index.train_sample)
            where = "faiss-cpu"
            if backend != "faiss" or (factory == "Flat" and args.device.startswith("cuda")):
                index, where = place_index(index, "torch" if backend == "faiss" else backend, use_gpu=True)
            indices[factory, backend] = index, where
            print(f"built {factory} ({where}) in {time.perf_counter() - t0:.1f} s", flush=True)
        index, where = indices[factory, backend]
        k = k or cfg.resmem.k
        top_m = top_m or manifest["top_m"]
        if (factory, nprobe, reader, value, k, top_m, backend) in seen:  # a row at the run's own k
            continue
        seen.add((factory, nprobe, reader, value, k, top_m, backend))
        read_rows = rows if top_m == manifest["top_m"] else {
            **rows, **{key: rows[key][:, :top_m] for key in ("residual_ids", "residuals")}}
        threshold = value if reader == "confidence" else 1.0
        at_k = with_setting(cfg, {p: per_k[k][p] for p in summary["searched"]}) if k in per_k else cfg
        c = dataclasses.replace(at_k, resmem=dataclasses.replace(at_k.resmem, gate_threshold=threshold, k=k))
        opens = retrieval_opens(summary["retrieval_gate"], value) if reader == "retrieval" else None
        read = ("every token" if reader == "all" else f"max p < {value:g}" if reader == "confidence"
                else f"retrieval gate at {value:.0%} of val")
        kernel = "" if k == cfg.resmem.k else f" (sigma={c.resmem.sigma:g}, gate={c.resmem.gate:g})"
        name = (f"ResMem, {factory}" + (f" nprobe={nprobe}" if nprobe else "") + f", k={k}{kernel}"
                + ("" if top_m == manifest["top_m"] else f", top-{top_m} rows") + f", {read}")
        runs.append({"setting": f"{name} ({where})", "fn": lambda b, clock, index=index, c=c, nprobe=nprobe, opens=opens,
                     read_rows=read_rows: with_memory(model, b, index, read_rows, c, layer, nprobe, clock, opens)})
    for r in runs:  # quality and read fraction, untimed
        print(f"scoring {r['setting']}", flush=True)
        totals, reads = np.zeros(3), 0
        for b in batches:
            q, n = r["fn"](b, {})
            totals += token_metrics(q, b["labels"])
            reads += n
        r.update(accuracy=totals[0] / totals[2], perplexity=float(np.exp(totals[1] / totals[2])),
                 reads=reads / tokens, tps=0.0, pairs=[])

    def timed_pass(r: dict) -> float:
        """One pass over the batches: its seconds; a row keeps its best pass's tokens/s and parts."""
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, clock = time.perf_counter(), {}
        for b in batches:
            r["fn"](b, clock)
        seconds = time.perf_counter() - t0
        if tokens / seconds > r["tps"]:
            r.update(tps=tokens / seconds, parts={part: 1e6 * s / tokens for part, s in clock.items()})
        return seconds

    # Each setting's pass beside a pass of the plain LM, in turns over the settings: a busy or
    # quiet minute of the machine hits both sides of a ratio alike, and every other turn the
    # setting goes first (what one pass leaves behind, e.g. freed memory, falls on both).
    # A setting's ratio is the median over its pairs (under 0.25x after the first: one is enough).
    runs[0]["pairs"].append(1.0)
    for rep in range(args.repeats):
        for r in runs[1:]:
            if rep and np.median(r["pairs"]) < 0.25:
                continue
            if rep % 2:
                seconds = timed_pass(r)
                r["pairs"].append(timed_pass(runs[0]) / seconds)
            else:
                r["pairs"].append(timed_pass(runs[0]) / timed_pass(r))
    gain = runs[0]["perplexity"] - runs[1]["perplexity"]  # the run's tuned ResMem, exact search, every token
    for r in runs:
        r["ratio"] = float(np.median(r["pairs"]))
        r["kept"] = (runs[0]["perplexity"] - r["perplexity"]) / gain if gain > 0 else float("nan")
        print(f"{r['setting']:<60} {r['tps']:>9,.0f} tok/s {r['ratio']:.2f}x ppl {r['perplexity']:.2f} "
              f"acc {100 * r['accuracy']:.2f}% reads {100 * r['reads']:.1f}% us/token {parts(r)}", flush=True)
    budget = runs[0]["parts"]["model"] / 4  # what a setting may add a token at 0.8x
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    r = cfg.resmem
    chosen = "chosen by `resmem tune`" if summary else "the config's"
    lines = section("Token memory throughput" + (f": {args.variant}" if args.variant else ""), QUESTION, f"{run.root.name}: {meta.get('architecture', 'GPT-2')} LM "
                    f"({meta.get('layers', cfg.text.lm_layers)} layers, {meta['embedding_dim']} dims), {tokens:,} test "
                    f"tokens in batches of {args.batch} sequences (one search per batch), on {device}; load average "
                    f"{os.getloadavg()[0]:.1f} at the end; memory {vectors.shape[0]:,} x {vectors.shape[1]} "
                    f"({manifest['distance']}{'' if manifest['normalize'] else ', raw'}), k={r.k}, sigma={r.sigma:g}, "
                    f"gate={r.gate:g} ({chosen}). Each pass of a setting sits beside one of the plain LM (before it "
                    f"and after it in turns), in turns over the settings, {args.repeats} times: vs plain is the median "
                    "ratio of those pairs, tokens/s the best pass (a setting under 0.25x: one pair). A smaller k runs "
                    "at tune's best sigma and gate for it on val. Gain kept: the share of the first ResMem row's "
                    "perplexity gain over the plain LM. Microseconds per token, in the best pass: the model (forward "
                    "and softmax) / the gate / the search with the neighbours' rows / the correction. "
                    "At 0.8x the plain LM's tokens/s, the gate, search and correction together may take "
                    f"a quarter of the plain LM's {runs[0]['parts']['model']:.1f} us a token: {budget:.1f} us.", "",
                    "| setting | tokens/s | vs plain | perplexity | gain kept | accuracy (%) | tokens reading the memory | "
                    "us/token: model / gate / search / correction |",
                    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines += [f"| {r['setting']} | {r['tps']:,.0f} | {r['ratio']:.2f}x | {r['perplexity']:.2f} | "
              f"{100 * r['kept']:.0f}% | {100 * r['accuracy']:.2f} | {100 * r['reads']:.1f}% | {parts(r)} |" for r in runs]
    write(args.out, lines, args.variant)


if __name__ == "__main__":
    main()
