"""Quality cost of the sparse residual codec (top-m) against dense residuals, on a
finished LM run small enough for dense rows (a 2048-token vocabulary).

The run must embed with text.lm_embedding=final: the final hidden state h is then what
GPT-2's tied head reads, logits = h @ W_te^T, so each neighbour's full distribution can be
recomputed from its stored embedding; the dense residual is exact, and each top-m codec
is cut from the same distribution. Neighbours come from one exact search (FAISS Flat,
the run's distance); sigma and gate are chosen on the validation split with dense
residuals, then every codec is scored on test with that setting.

    python benchmarks/sparse_codec.py --run runs/bbc_lm
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from results import section, write  # noqa: E402

from resmem_ray.config import load_config  # noqa: E402
from resmem_ray.store.artifacts import read_split  # noqa: E402
from resmem_ray.core.knn import faiss_metric, prepare_queries# noqa: E402
from resmem_ray.core.knn import to_distance# noqa: E402
from resmem_ray.core.resmem import kernel_weights, softmax# noqa: E402
from resmem_ray.store.rundir import RunDir# noqa: E402
from resmem_ray.core.sparse import clip_renormalise, corrected_probs, encode, token_metrics# noqa: E402


QUESTION = "What do top-m sparse residual rows lose against dense rows for a token LM, and what do they save?"


def scores(q_logits, labels, nb_dist, nb_ids, nb_labels, head, sigma, gate, m, T, floor, chunk=256):
    """Next-token (accuracy, perplexity) of ResMem with top-m rows (m=None: dense rows)."""
    totals = np.zeros(3)
    for s in range(0, len(labels), chunk):
        sl = slice(s, s + chunk)
        n, k = nb_ids[sl].shape
        p = softmax(q_logits[sl], T)
        w = kernel_weights(nb_dist[sl], sigma)
        nb_logits = head(nb_ids[sl].ravel())  # (n * k, V)
        if m is None:
            r = -softmax(nb_logits, T)
            r[np.arange(n * k), nb_labels[sl].ravel()] += 1.0
            q = clip_renormalise(p + gate * np.einsum("nk,nkv->nv", w, r.reshape(n, k, -1)), p, floor)
        else:
            ids, probs = encode(nb_logits, m, T)
            q = corrected_probs(p, w, nb_labels[sl], ids.reshape(n, k, -1), probs.reshape(n, k, -1), gate, floor)
        totals += token_metrics(q, labels[sl])
    return totals[0] / totals[2], float(np.exp(totals[1] / totals[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/bbc_lm")
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16, 32, 64, 256])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    parser.add_argument("--gates", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args()
    run = RunDir(args.run)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:  # the run's own config
        f.write(json.dumps(run.manifest()["config"]))
        f.flush()
        cfg = load_config(f.name)
    if cfg.text.lm_embedding != "final":
        sys.exit("the run must use text.lm_embedding=final (logits are recomputed from the final hidden state)")
    r, T, floor = cfg.resmem, cfg.resmem.temperature, cfg.text.prob_floor
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(run.model), local_files_only=True)
    weight = model.get_output_embeddings().weight.detach().float().numpy()  # (V, d)
    vocab = weight.shape[0]
    train = read_split(run, "train", "benchmark", columns=("id", "label", "embedding", "top_ids"))
    head = lambda rows: train["embedding"][rows] @ weight.T  # noqa: E731
    check = encode(head(np.arange(50)), train["top_ids"].shape[1], T)[0]
    match = (check == train["top_ids"][:50]).mean()
    if match < 0.99:
        sys.exit(f"recomputed top-m ids match the stored ones on {match:.0%} of entries: not the final hidden state?")
    index = faiss.IndexFlat(train["embedding"].shape[1], faiss_metric(r.distance))
    index.add(prepare_queries(train["embedding"], r.distance, r.normalize))
    found = {}
    for split in ("val", "test"):
        t = read_split(run, split, "benchmark", columns=("id", "label", "embedding", "logits"))
        raw, nn = index.search(prepare_queries(t["embedding"], r.distance, r.normalize), r.k)
        found[split] = (t["logits"], t["label"], to_distance(raw, r.distance), nn, train["label"][nn])
    t0 = time.time()
    grid = [(scores(*found["val"], head, s, g, None, T, floor), s, g) for s in args.sigmas for g in args.gates]
    (_, val_ppl), sigma, gate = min(grid, key=lambda x: x[0][1])  # lowest validation perplexity
    test_logits, test_labels = found["test"][0], found["test"][1]
    base = token_metrics(softmax(test_logits), test_labels)
    rows = [("base model (no memory)", "-", base[0] / base[2], float(np.exp(base[1] / base[2])))]
    rows.append((f"ResMem, dense rows (V={vocab})", f"{vocab * 4:,}",
                 *scores(*found["test"], head, sigma, gate, None, T, floor)))
    for m in args.ms:
        rows.append((f"ResMem, top-{m} sparse rows", f"{8 + m * 8:,}",
                     *scores(*found["test"], head, sigma, gate, m, T, floor)))
    lines = section("Sparse residual codec: top-m vs dense residuals (LM)", QUESTION,
                    f"Run `{args.run}`: GPT-2 {cfg.text.lm_layers} layers x {cfg.text.lm_dim} dims, "
                    f"byte-level BPE vocabulary {vocab}, trained on BBC News (first {cfg.text.max_length} tokens "
                    f"of each article). Memory: {len(train['id']):,} train tokens; {len(test_labels):,} test "
                    f"tokens. k={r.k}, distance={r.distance}, T={T}, prob_floor={floor}; sigma={sigma}, "
                    f"gate={gate} chosen on {len(found['val'][1]):,} validation tokens with dense rows "
                    f"(validation perplexity {val_ppl:.2f}). Bytes per memory token: float32 probabilities + "
                    f"int32 ids + int64 label. {time.time() - t0:.0f} s.", "",
                    "| residual rows | bytes / memory token | next-token accuracy (%) | perplexity |",
                    "| --- | ---: | ---: | ---: |")
    lines += [f"| {name} | {size} | {100 * acc:.2f} | {ppl:.2f} |" for name, size, acc, ppl in rows]
    write(args.out, lines)


if __name__ == "__main__":
    main()
