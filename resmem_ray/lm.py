"""Token-level ResMem for causal language models (model.name=gpt2_lm).

Every token position t of a text is one memory row: its embedding (the final hidden
state, or the input of the last block: text.lm_embedding), its label (the next token)
and its residual in the sparse codec (sparse.py: the base model's top-m token ids and
probabilities at resmem.temperature). The stages are the vision ones:

  embed     rows of every split; val/test rows also keep their dense logits (queries
            need their own full distribution; the memory never does)
  index     the usual FAISS shards, the sparse rows in place of dense residuals
  evaluate  next-token accuracy and perplexity, base vs ResMem, and the memory's
            residual storage against what dense rows would take
"""

from __future__ import annotations

import numpy as np
import torch

from resmem_ray.config import Config
from resmem_ray.embed import read_split
from resmem_ray.errors import ResMemError
from resmem_ray.index import prepare_queries, read_index_manifest, write_shards
from resmem_ray.lookup import ShardedMemory
from resmem_ray.resmem import kernel_weights, softmax
from resmem_ray.rundir import RunDir, atomic_dir, write_json
from resmem_ray.sparse import corrected_probs, encode, token_metrics


class LMEmbedder:
    """A Ray Data actor: one LM replica; a batch of texts in, one row per next-token
    prediction out (id = text id * max_length + position)."""

    def __init__(self, run_dir: str, temperature: float, num_threads: int, keep_logits: bool, top_m: int,
                 layer: str):
        from resmem_ray.text import load_text_model

        torch.set_num_threads(num_threads)
        self.model, _, self.meta = load_text_model(RunDir(run_dir))
        self.temperature, self.keep_logits, self.top_m = temperature, keep_logits, top_m
        self.hidden = -1 if layer == "final" else -2  # hidden_states[-2]: the last block's input

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             output_hidden_states=True)
        rows, pos = np.nonzero(mask[:, 1:])  # positions whose next token is real
        logits = out.logits[rows, pos].float().numpy()
        top_ids, top_probs = encode(logits, self.top_m, self.temperature)
        result = {"id": batch["id"][rows] * ids.shape[1] + pos, "label": ids[rows, pos + 1],
                  "embedding": out.hidden_states[self.hidden][rows, pos].float().numpy(),
                  "top_ids": top_ids, "top_probs": top_probs}
        if self.keep_logits:
            result["logits"] = logits
        return result


def build_lm_index(cfg: Config) -> dict:
    """The index stage for token memories: sparse residual rows from the embed stage."""
    run = RunDir(cfg.run_dir)
    embedded = run.stage_output("embed", needed_by="index")
    r = cfg.resmem
    if embedded["temperature"] != r.temperature or embedded.get("top_m") != cfg.text.top_m:
        raise ResMemError(f"the sparse residuals were embedded at resmem.temperature={embedded['temperature']}, "
                          f"text.top_m={embedded.get('top_m')}; the config asks for {r.temperature}, "
                          f"{cfg.text.top_m}: rerun `resmem embed`")
    train = read_split(run, "train", needed_by="index", columns=("id", "label", "embedding", "top_ids", "top_probs"))
    n, dim = train["embedding"].shape
    run.mark_running("index", cfg.to_dict())
    emb = prepare_queries(train["embedding"], r.distance, r.normalize)
    print(f"[index] {n} token rows x {dim} dims -> {cfg.index.num_shards} '{cfg.index.factory}' shard(s), "
          f"sparse residuals (top-{train['top_ids'].shape[1]})", flush=True)
    with atomic_dir(run.index) as tmp:
        manifest = write_shards(tmp, emb, train["id"], train["label"], train["top_probs"], cfg.index, r.distance,
                                r.normalize, r.temperature, residual_ids=train["top_ids"])
        manifest.update(codec="sparse", top_m=int(train["top_ids"].shape[1]), num_classes=embedded["num_classes"],
                        next_id=1 + embedded["max_id"])
        write_json(tmp / "manifest.json", manifest)
    sizes = residual_storage(manifest)
    print(f"[index] residual storage: {sizes['sparse_bytes'] / 2**20:.2f} MiB sparse vs "
          f"{sizes['dense_bytes'] / 2**20:.2f} MiB as dense rows", flush=True)
    run.mark_done("index", cfg.to_dict(), rows=int(n), num_shards=len(manifest["shards"]), **sizes)
    return manifest


def residual_storage(manifest: dict) -> dict:
    """Bytes of the memory's residuals: sparse (label + top-m ids and probabilities per
    row) and what dense vocabulary-sized rows would take in the same dtype."""
    rows, m, vocab = manifest["rows"], manifest["top_m"], manifest["num_classes"]
    prob = np.dtype(manifest["residual_dtype"]).itemsize
    return {"sparse_bytes": rows * (8 + m * (4 + prob)), "dense_bytes": rows * vocab * prob}


def lm_metrics(logits: np.ndarray, labels: np.ndarray, nb, cfg: Config, batch: int = 1024) -> dict:
    """Next-token accuracy and perplexity of the base model (T=1) and of ResMem (its
    clipped, renormalised distribution over the base probabilities at resmem.temperature)."""
    r = cfg.resmem
    totals = {"base": np.zeros(3), "resmem": np.zeros(3)}
    near = nb.first(r.k)
    for s in range(0, len(labels), batch):
        sl = slice(s, s + batch)
        w = kernel_weights(near.distances[sl], r.sigma)
        p = softmax(logits[sl], r.temperature)
        q = corrected_probs(p, w, near.labels[sl], near.residual_ids[sl], near.residuals[sl], r.gate,
                            cfg.text.prob_floor)
        totals["base"] += token_metrics(softmax(logits[sl]), labels[sl])
        totals["resmem"] += token_metrics(q, labels[sl])
    return {m: {"accuracy": t[0] / t[2], "perplexity": float(np.exp(t[1] / t[2]))} for m, t in totals.items()}


def evaluate_lm(cfg: Config) -> dict:
    from resmem_ray.evaluate import check_matches_index

    run = RunDir(cfg.run_dir)
    manifest = read_index_manifest(run, needed_by="evaluate")
    if manifest.get("codec") != "sparse":
        raise ResMemError(f"{run.index} is not a token memory (no sparse codec): rerun `resmem index`")
    check_matches_index(cfg, manifest)
    if cfg.resmem.k > manifest["rows"]:
        raise ResMemError(f"resmem.k={cfg.resmem.k} is larger than the memory ({manifest['rows']} rows)")
    test = read_split(run, "test", needed_by="evaluate", columns=("id", "label", "embedding", "logits"))
    queries = prepare_queries(test["embedding"], cfg.resmem.distance, cfg.resmem.normalize)
    run.mark_running("evaluate", cfg.to_dict())
    print(f"[evaluate] {len(queries)} test tokens against {manifest['rows']} memory tokens in "
          f"{len(manifest['shards'])} shard actor(s), k={cfg.resmem.k}", flush=True)
    with ShardedMemory(run.index, manifest, cfg.index) as memory:
        nb = memory.search_batches(queries, cfg.resmem.k, cfg.evaluate.batch_size)
    scores = lm_metrics(test["logits"], test["label"], nb, cfg)
    sizes = residual_storage(manifest)
    metrics = {"task": "lm", "num_test_tokens": int(len(queries)), "memory_rows": manifest["rows"],
               "num_shards": len(manifest["shards"]), "vocab_size": manifest["num_classes"],
               "top_m": manifest["top_m"], **sizes, **{f"{m}_{k}": v for m, d in scores.items() for k, v in d.items()},
               "accuracy": {m: d["accuracy"] for m, d in scores.items()}, "resmem": cfg.resmem.__dict__,
               "prob_floor": cfg.text.prob_floor}
    with atomic_dir(run.report) as tmp:
        write_json(tmp / "metrics.json", metrics)
        (tmp / "report.md").write_text(lm_report(cfg, metrics))
    run.mark_done("evaluate", cfg.to_dict(), accuracy=metrics["accuracy"],
                  perplexity={m: d["perplexity"] for m, d in scores.items()})
    return metrics


def lm_report(cfg: Config, m: dict) -> str:
    r = cfg.resmem
    lines = [f"# ResMem report: {cfg.data.name}, next-token prediction (GPT-2, {cfg.text.lm_layers} layers, "
             f"{cfg.text.lm_dim} dims, vocabulary {m['vocab_size']})", "",
             f"Test split: {m['num_test_tokens']} tokens; memory: {m['memory_rows']} training tokens in "
             f"{m['num_shards']} shard(s), embedding: {cfg.text.lm_embedding}.",
             f"ResMem: k={r.k}, sigma={r.sigma}, T={r.temperature}, gate={r.gate}, distance={r.distance}; "
             f"corrected distribution clipped below at {cfg.text.prob_floor} x p and renormalised.",
             f"Residual storage: {m['sparse_bytes'] / 2**20:.2f} MiB sparse (top-{m['top_m']}) vs "
             f"{m['dense_bytes'] / 2**20:.2f} MiB dense.", "",
             "| method | next-token accuracy (%) | perplexity |", "| --- | ---: | ---: |",
             f"| base model | {100 * m['base_accuracy']:.2f} | {m['base_perplexity']:.2f} |",
             f"| ResMem | {100 * m['resmem_accuracy']:.2f} | {m['resmem_perplexity']:.2f} |"]
    return "\n".join(lines) + "\n"
