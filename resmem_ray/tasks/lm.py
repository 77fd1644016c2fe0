"""Token-level ResMem for causal language models (model.name=gpt2_lm: a GPT-2 trained from
scratch, or with model.source=checkpoint any Hugging Face causal LM folder with its tokenizer).

Every token position t of a text is one memory row: its embedding (the final hidden
state, or the input of the last block: text.lm_embedding), its label (the next token)
and its residual in the sparse codec (sparse.py: the base model's top-m token ids and
probabilities at resmem.temperature). The stages are the same as for images:

  embed     rows of every split, the top-m encoded at resmem.temperature (so T reruns
            embed here); val/test rows also keep their dense logits (queries need
            their own full distribution; the memory never does)
  index     the usual FAISS shards, the sparse rows in place of dense residuals
  evaluate  next-token accuracy and perplexity of the base model, the neighbour baselines
            (tasks/methods.py: kNN interpolation, titled kNN-LM here) and ResMem, and the
            memory's residual storage against what dense rows would take
  tune      k, sigma, the gate and the memory's distance by val perplexity, kNN-LM's k, lambda
            and tau on the same neighbours (T stays the one the top-m were encoded at),
            then the retrieval gate on val (core/gates.py): which tokens the memory helps,
            told from the model's own max p, entropy and hidden-state norm; evaluate
            reports the perplexity and the share of tokens searched at its cut-offs
"""

from __future__ import annotations

import numpy as np
import torch

from resmem_ray.core.gates import fit_retrieval_gate, retrieval_features, retrieval_gate
from resmem_ray.core.resmem import confidence_gate, kernel_weights, softmax
from resmem_ray.core.sparse import corrected_probs, encode, token_metrics
from resmem_ray.errors import ResMemError
from resmem_ray.log import stage_log
from resmem_ray.runtime.embedding import map_with_model
from resmem_ray.schema import Config, ResMemConfig
from resmem_ray.store.artifacts import footprint_line, read_model_meta
from resmem_ray.store.files import atomic_dir
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.methods import (neighbour_baselines, setting, setting_line, setting_record, title,
                                      tuned_baselines, tuning_lines)
from resmem_ray.tasks.registry import Scorer, register
from resmem_ray.tasks.splits import Split
from resmem_ray.tasks.text import SOURCE_KEYS, TextTask, load_text_model, train_bpe

log = stage_log("train")


class LMEmbedder:
    """A Ray Data actor: one LM replica; a batch of texts in, one row per next-token
    prediction out (id = text id * max_length + position)."""

    def __init__(self, run_dir: str, temperature: float, num_threads: int, keep_logits: bool, top_m: int,
                 layer: str):
        torch.set_num_threads(num_threads)
        self.model, _, self.meta = load_text_model(RunDir(run_dir))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # embed.gpus_per_actor gave it one
        self.model.to(self.device)
        self.temperature, self.keep_logits, self.top_m = temperature, keep_logits, top_m
        self.layer = layer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows, pos = np.nonzero(mask[:, 1:])  # positions whose next token is real
        at = (torch.as_tensor(rows, device=self.device), torch.as_tensor(pos, device=self.device))
        with torch.inference_mode():
            logits, hidden = logits_and_states(self.model, torch.tensor(ids, device=self.device),
                                               torch.tensor(mask, device=self.device), at, self.layer)
        logits = logits.float().cpu().numpy()
        top_ids, top_probs = encode(logits, self.top_m, self.temperature)
        result = {"id": batch["id"][rows] * ids.shape[1] + pos, "label": ids[rows, pos + 1],
                  "embedding": hidden.float().cpu().numpy(),
                  "top_ids": top_ids, "top_probs": top_probs}
        if self.keep_logits:
            result["logits"] = logits
        return result


def logits_and_states(model, input_ids, attention_mask, at, layer: str):
    """A causal LM's next-token logits and the memory's hidden states (text.lm_embedding)
    at positions `at` (rows, positions). The final hidden state is what the output layer
    reads, caught by a hook: asking for every layer's states (output_hidden_states) keeps
    them all alive, ~12% of a GPT-2-small forward on a CPU. The last block's input
    (hidden_states[-2]) has no layer to hook that every architecture names alike."""
    if layer != "final":
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits[at], out.hidden_states[-2][at]
    caught = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _, inputs, __: caught.append(inputs[0]))
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        hook.remove()
    return logits[at], caught[0][at]


def residual_storage(manifest: dict) -> dict:
    """Bytes of the memory's residuals: sparse (label + top-m ids and probabilities per
    row) and what dense vocabulary-sized rows would take in the same dtype."""
    rows, m, vocab = manifest["rows"], manifest["top_m"], manifest["num_classes"]
    prob = np.dtype(manifest["residual_dtype"]).itemsize
    scale = 4 if manifest["residual_dtype"] == "int8" else 0  # a float32 scale per row
    return {"sparse_bytes": rows * (8 + scale + m * (4 + prob)), "dense_bytes": rows * (vocab * prob + scale)}


def token_reads(logits: np.ndarray, r: ResMemConfig, batch: int = 4096) -> np.ndarray:
    """The tokens whose confidence gate is open (resmem.gate_threshold, gate_softness on
    max p at resmem.temperature): only they read the memory, the others keep p."""
    return np.concatenate([open_gate(softmax(logits[s:s + batch], r.temperature), r) > 0
                           for s in range(0, len(logits), batch)]) if len(logits) else np.zeros(0, bool)


def open_gate(p: np.ndarray, r: ResMemConfig) -> np.ndarray:
    """The confidence gate per token without resmem.gate's factor: 0 where it is closed."""
    return confidence_gate(p, 1.0, r.gate_threshold, r.gate_softness)


def corrected_token_probs(p: np.ndarray, g: np.ndarray, distances, labels, residual_ids, residuals,
                          cfg: Config) -> np.ndarray:
    """ResMem's distribution for tokens with probabilities p (at resmem.temperature) and
    confidence gate g (open_gate): corrected where g > 0, p where it is closed. The
    neighbour arrays (resmem.k per token) are those of the open tokens only, in order.
    May be written into p (vocabulary-wide rows are copied as little as possible)."""
    found = g > 0
    weights = kernel_weights(distances, cfg.resmem.sigma)
    if found.all():
        return corrected_probs(p, weights, labels, residual_ids, residuals, cfg.resmem.gate * g, cfg.text.prob_floor)
    p[found] = corrected_probs(p[found], weights, labels, residual_ids, residuals, cfg.resmem.gate * g[found],
                               cfg.text.prob_floor)
    return p


def lm_metrics(logits: np.ndarray, labels: np.ndarray, nb, cfg: Config, reads: np.ndarray | None = None,
               batch: int = 1024, methods: tuple[str, ...] | None = None) -> dict:
    """lm_totals' scores: {method: {"accuracy", "perplexity"}}."""
    return token_scores(lm_totals(logits, labels, nb, cfg, reads, batch, methods))


def token_scores(totals: dict[str, np.ndarray]) -> dict:
    """Accuracy and perplexity from (tokens right, summed -log q(label), tokens) per method."""
    return {m: {"accuracy": t[0] / t[2], "perplexity": float(np.exp(t[1] / t[2]))} for m, t in totals.items()}


def lm_totals(logits: np.ndarray, labels: np.ndarray, nb, cfg: Config, reads: np.ndarray | None = None,
              batch: int = 1024, methods: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Next-token accuracy and perplexity of the base model (T=1), of each neighbour baseline
    (tasks/methods.py; kNN-LM: (1 - lambda) p + lambda p_kNN over its knn_k nearest neighbours'
    next tokens, resmem.knn_lambda / knn_tau) and of ResMem (its clipped, renormalised
    distribution); the last two over p at resmem.temperature. Where the confidence gate is
    closed (memory_reads), they keep p. `nb` answers the tokens marked in `reads` (None:
    every token). `methods`: only these (None: every one)."""
    r = cfg.resmem
    baselines = [m for m in neighbour_baselines() if methods is None or m.key in methods]
    keys = methods or ("base", *(m.key for m in baselines), "resmem")
    totals = {m: np.zeros(3) for m in keys}
    near = nb.first(r.k)
    row = np.arange(len(labels)) if reads is None else np.cumsum(reads) - 1  # token -> its row of nb
    for s in range(0, len(labels), batch):
        sl = slice(s, s + batch)
        p = softmax(logits[sl], r.temperature)
        g = open_gate(p, r)
        found = np.nonzero(g > 0)[0]
        if reads is not None and not reads[s + found].all():
            raise ResMemError("the neighbours do not cover every token whose confidence gate is open "
                              "(resmem.gate_threshold, resmem.gate_softness)")
        at = row[s + found]
        for m in baselines:
            q = p.copy()
            q[found] = m.probs(p[found], nb.labels[at], nb.distances[at], setting(cfg, m))
            totals[m.key] += token_metrics(q, labels[sl])
        if "resmem" in totals:  # last: corrected_token_probs writes into p
            q = corrected_token_probs(p, g, near.distances[at], near.labels[at], near.residual_ids[at],
                                      near.residuals[at], cfg)
            totals["resmem"] += token_metrics(q, labels[sl])
        if "base" in totals:
            totals["base"] += token_metrics(softmax(logits[sl]), labels[sl])
    return totals


RETRIEVAL_FRACTIONS = (0.1, 0.25, 0.5, 0.75)  # shares of val tokens the retrieval gate's cut-offs open


def token_logprobs(logits: np.ndarray, labels: np.ndarray, nb, cfg: Config, reads: np.ndarray | None = None,
                   batch: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token: log p(label) at resmem.temperature, ResMem's log q(label) (q = p where the
    confidence gate is closed) and the retrieval features of p (the embedding norm left
    out: the caller's). `nb` and `reads` as in lm_metrics."""
    r, near = cfg.resmem, nb.first(cfg.resmem.k)
    row = np.arange(len(labels)) if reads is None else np.cumsum(reads) - 1
    logp, logq, features = [], [], []
    for s in range(0, len(labels), batch):
        sl, y = slice(s, s + batch), labels[s:s + batch]
        p = softmax(logits[sl], r.temperature)
        features.append(retrieval_features(p, np.zeros(len(p)))[:, :2])
        logp.append(np.log(p[np.arange(len(y)), y]))
        g = open_gate(p, r)
        at = row[s + np.nonzero(g > 0)[0]]
        q = corrected_token_probs(p, g, near.distances[at], near.labels[at], near.residual_ids[at],
                                  near.residuals[at], cfg)
        logq.append(np.log(q[np.arange(len(y)), y]))
    if not logp:
        return np.zeros(0), np.zeros(0), np.zeros((0, 2))
    return np.concatenate(logp), np.concatenate(logq), np.concatenate(features)


def gated_perplexities(logp: np.ndarray, logq: np.ndarray, scores: np.ndarray, cutoffs) -> list[dict]:
    """ResMem's perplexity where the retrieval gate opens only the tokens whose score reaches
    each cut-off (the others keep p), and the share of tokens it opens."""
    rows = []
    for cutoff in cutoffs:
        opened = scores >= cutoff
        rows.append({"cutoff": float(cutoff), "searched": float(opened.mean()),
                     "perplexity": float(np.exp(-np.where(opened, logq, logp).mean()))})
    return rows


def fit_retrieval_gate_on_val(cfg: Config, table: dict) -> dict:
    """The retrieval gate at cfg's (the chosen) setting: fitted on val to tell the tokens
    whose true next token ResMem makes more likely; cut-offs at the scores that open
    RETRIEVAL_FRACTIONS of val's tokens (and every token), each with its val perplexity."""
    val = table["val"]
    logp, logq, features = token_logprobs(val["logits"], val["label"], table["neighbours"], cfg)
    features = np.column_stack([features, val["embedding_norm"]])
    params = fit_retrieval_gate(features, logq > logp)
    scores = retrieval_gate(params, features)
    cutoffs = [*np.quantile(scores, [1 - f for f in RETRIEVAL_FRACTIONS]), 0.0]
    return {**params, "val": gated_perplexities(logp, logq, scores, cutoffs)}


def retrieval_gate_scores(cfg: Config, test: dict, nb, reads, gate: dict) -> tuple[np.ndarray, ...]:
    """Per test token: log p(label), ResMem's log q(label) and the retrieval gate's score
    (the gate fitted on val)."""
    logp, logq, features = token_logprobs(test["logits"], test["label"], nb, cfg, reads)
    return logp, logq, retrieval_gate(gate, np.column_stack([features, np.linalg.norm(test["embedding"], axis=1)]))


def model_line(cfg: Config, meta: dict) -> str:
    """The base model in the report's title: the run's own GPT-2 or the given model."""
    name = "GPT-2" if cfg.model.source == "trained" else f"{meta.get('architecture')} of {cfg.model.path}"
    return f"{name}, {meta.get('layers', cfg.text.lm_layers)} layers, {meta['embedding_dim']} dims"


def lm_report(cfg: Config, m: dict) -> str:
    r = cfg.resmem
    lines = [f"# ResMem report: {cfg.data.name}, next-token prediction ({m['base_model']}, vocabulary "
             f"{m['vocab_size']})", "",
             f"Test split: {m['num_test_tokens']} tokens; memory: {m['memory_rows']} training tokens in "
             f"{m['num_shards']} shard(s), {m['memory_footprint']}, embedding: {cfg.text.lm_embedding}.",
             f"ResMem: k={r.k}, sigma={r.sigma}, T={r.temperature}, gate={r.gate}, distance={r.distance}; "
             f"corrected distribution clipped below at {cfg.text.prob_floor} x p and renormalised.",
             *(setting_line(b, m[b.key], "lm") for b in neighbour_baselines()),
             f"Residual storage: {m['sparse_bytes'] / 2**20:.2f} MiB sparse (top-{m['top_m']}) vs "
             f"{m['dense_bytes'] / 2**20:.2f} MiB dense.",
             f"Confidence gate: {100 * m['memory_read_fraction']:.1f}% of test tokens read the memory "
             f"(resmem.gate_threshold={r.gate_threshold}, gate_softness={r.gate_softness}); the others "
             "keep p.", "",
             "| method | next-token accuracy (%) | perplexity |", "| --- | ---: | ---: |"]
    lines += [f"| {title(key, 'lm')} | {100 * m[f'{key}_accuracy']:.2f} | {m[f'{key}_perplexity']:.2f} |"
              for key in m["accuracy"]]
    if m.get("tuning"):
        lines += tuning_lines(m["tuning"], "lm")
    if m.get("retrieval_gate"):
        g = m["tuning"]["retrieval_gate"]
        lines += ["", f"## Learned retrieval gate (logistic regression on {', '.join(g['features'])}; fitted on "
                  f"{g['fit_examples']} val tokens, the memory helped {g['fit_helped']})", "",
                  "Only the tokens whose score reaches the cut-off are searched; the others keep p.", "",
                  "| cut-off | val tokens searched (%) | val perplexity | test tokens searched (%) | test perplexity |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {row['cutoff']:.3f} | {100 * row['val_searched']:.1f} | {row['val_perplexity']:.2f} | "
                  f"{100 * row['searched']:.1f} | {row['perplexity']:.2f} |" for row in m["retrieval_gate"]]
    return "\n".join(lines) + "\n"


@register
class TokenLM(TextTask):
    name = "lm"
    models = ("gpt2_lm",)
    lm = True
    codec = "sparse"
    one_row_per_example = False
    memory_columns = ("id", "label", "embedding", "top_ids", "top_probs")
    reads = {"train": SOURCE_KEYS + ("text.max_length", "text.pretrained", "text.tokenizer", "text.vocab_size",
                                     "text.lm_layers", "text.lm_dim", "text.lm_heads"),
             "embed": ("resmem.temperature", "text.top_m", "text.lm_embedding"),
             "evaluate": ("text.prob_floor",)}
    builds_model = ("text.pretrained", "text.tokenizer", "text.vocab_size", "text.lm_layers", "text.lm_dim",
                    "text.lm_heads")

    def tokenizer(self, cfg: Config, run: RunDir) -> str:
        return str(run.root / "tokenizer") if cfg.text.tokenizer == "bpe" else super().tokenizer(cfg, run)

    def prepare_tokenizer(self, cfg: Config, run: RunDir, splits: dict) -> None:
        if cfg.text.tokenizer == "bpe":
            with atomic_dir(run.root / "tokenizer") as tmp:
                log.info(f"training a {cfg.text.vocab_size}-token byte-level BPE on "
                         f"{len(splits['train'])} train texts")
                train_bpe(splits["train"].texts, cfg.text.vocab_size, tmp)

    def embed_rows(self, cfg: Config, run: RunDir, split: Split, split_name: str, meta: dict):
        kwargs = {"run_dir": run.location, "temperature": cfg.resmem.temperature, "keep_logits": split_name != "train",
                  "top_m": cfg.text.top_m, "layer": cfg.text.lm_embedding}
        return map_with_model(self.token_rows(cfg, run, split, meta), LMEmbedder, kwargs, cfg.embed)

    def embed_info(self, cfg: Config, splits: dict, meta: dict) -> dict:
        max_id = max(int(s.ids.max()) for s in splits.values())
        return {"max_id": (max_id + 1) * meta["max_length"], "temperature": cfg.resmem.temperature,
                "top_m": cfg.text.top_m}

    def memory_rows(self, cfg: Config, rows: dict, temperature: float, embedded: dict) -> dict:
        if embedded["temperature"] != temperature or embedded.get("top_m") != cfg.text.top_m:
            raise ResMemError(f"the sparse residuals were embedded at resmem.temperature={embedded['temperature']}, "
                              f"text.top_m={embedded.get('top_m')}; the config asks for {temperature}, "
                              f"{cfg.text.top_m}: rerun `resmem embed`")
        extra = {"top_m": int(rows["top_ids"].shape[1]), "num_classes": embedded["num_classes"]}
        return {"residuals": rows["top_probs"], "residual_ids": rows["top_ids"], "manifest": extra}

    def memory_info(self, cfg: Config, manifest: dict) -> dict:
        sizes = residual_storage(manifest)
        return {**sizes, "lines": [f"residual storage: {sizes['sparse_bytes'] / 2**20:.2f} MiB sparse "
                                   f"(top-{manifest['top_m']}) vs {sizes['dense_bytes'] / 2**20:.2f} MiB as dense rows"]}

    tune_keys = ("k", "sigma", "gate", "distance", "normalize")  # T stays the index's: the top-m were encoded at it
    scores = ("val_perplexity", "val_accuracy")
    mode = "min"

    def val_scores(self, cfg: Config, table: dict, methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
        scores = lm_metrics(table["val"]["logits"], table["val"]["label"], table["neighbours"], cfg, methods=methods)
        return {m: {"val_perplexity": d["perplexity"], "val_accuracy": d["accuracy"]} for m, d in scores.items()}

    def tuned_baselines(self) -> list:
        return tuned_baselines()

    def fit_on_val(self, cfg: Config, table: dict) -> dict:
        return {"retrieval_gate": fit_retrieval_gate_on_val(cfg, table)} if cfg.tune.learned_gate else {}

    def memory_reads(self, cfg: Config, test: dict) -> np.ndarray:
        return token_reads(test["logits"], cfg.resmem)

    def scorer(self, cfg: Config, run: RunDir, manifest: dict, folder, tuning: dict | None = None) -> Scorer:
        return LMScorer(cfg, run, manifest, folder, tuning)

    def done_info(self, metrics: dict) -> dict:
        return {"accuracy": metrics["accuracy"],
                "perplexity": {m: metrics[f"{m}_perplexity"] for m in metrics["accuracy"]}}



class LMScorer(Scorer):
    """Next-token accuracy and perplexity of every method as running totals over the test
    tokens, chunk by chunk; with the retrieval gate, three numbers per token (log p, log q,
    its score) for its table at the val cut-offs."""

    def __init__(self, cfg: Config, run: RunDir, manifest: dict, folder, tuning: dict | None):
        self.cfg, self.run, self.manifest, self.folder, self.tuning = cfg, run, manifest, folder, tuning
        self.gate = (tuning or {}).get("retrieval_gate")
        self.totals, self.tokens, self.read, self.per_token = {}, 0, 0, []

    def add(self, rows: dict, queries, nb, reads) -> None:
        for m, t in lm_totals(rows["logits"], rows["label"], nb, self.cfg, reads).items():
            self.totals[m] = self.totals.get(m, 0) + t
        self.tokens, self.read = self.tokens + len(rows["label"]), self.read + int(reads.sum())
        if self.gate:
            self.per_token.append(retrieval_gate_scores(self.cfg, rows, nb, reads, self.gate))

    def finish(self) -> dict:
        cfg, manifest, tuning = self.cfg, self.manifest, self.tuning
        scores = token_scores(self.totals)
        metrics = {"task": "lm", "base_model": model_line(cfg, read_model_meta(self.run, needed_by="evaluate")),
                   "num_test_tokens": self.tokens, "memory_rows": manifest["rows"],
                   "memory_read_fraction": self.read / self.tokens if self.tokens else 0.0,
                   "num_shards": len(manifest["shards"]), "vocab_size": manifest["num_classes"],
                   "top_m": manifest["top_m"], "memory_footprint": footprint_line(manifest),
                   **residual_storage(manifest), **{f"{m}_{k}": v for m, d in scores.items() for k, v in d.items()},
                   "accuracy": {m: d["accuracy"] for m, d in scores.items()}, "resmem": cfg.resmem.__dict__,
                   "prob_floor": cfg.text.prob_floor, "tuning": tuning,
                   **{b.key: setting_record(cfg, b, tuning) for b in neighbour_baselines()}}
        if self.gate:
            logp, logq, gate_scores = (np.concatenate(c) for c in zip(*self.per_token))
            cutoffs = [v["cutoff"] for v in self.gate["val"]]
            metrics["retrieval_gate"] = [{**row, "val_searched": v["searched"], "val_perplexity": v["perplexity"]}
                                         for row, v in zip(gated_perplexities(logp, logq, gate_scores, cutoffs),
                                                           self.gate["val"])]
        (self.folder / "report.md").write_text(lm_report(cfg, metrics))
        return metrics
