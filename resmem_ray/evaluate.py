"""Stage 4, evaluate: answer the test split from the sharded memory and report.

Methods, as in the memorization study:
  base           argmax of the model's logits
  k-NN (k=...)   majority vote over the k nearest training examples
  ResMem         argmax of p + gate * sum_i w_i r_i
  oracle gate    per example, base or 1-NN, whichever is right (an upper bound)
Writes RUN/report/metrics.json, report.md, predictions.parquet and accuracy_vs_k.png.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resmem_ray.config import Config
from resmem_ray.embed import read_split
from resmem_ray.errors import ResMemError
from resmem_ray.index import prepare_queries, read_index_manifest
from resmem_ray.lookup import Neighbours, ShardedMemory
from resmem_ray.resmem import confidence_gate, knn_vote, resmem_probs, softmax
from resmem_ray.rundir import RunDir, atomic_dir, write_json


def check_matches_index(cfg: Config, manifest: dict) -> None:
    """The query-time settings must be those the index was built with."""
    for key in ("distance", "normalize", "temperature"):
        if getattr(cfg.resmem, key) != manifest[key]:
            raise ResMemError(f"config key resmem.{key}={getattr(cfg.resmem, key)!r} differs from "
                              f"the index's {manifest[key]!r}: rerun `resmem index`")


def predictions(cfg: Config, logits: np.ndarray, labels: np.ndarray, nb: Neighbours) -> dict[str, np.ndarray]:
    """Each method's predicted class for every query."""
    r = cfg.resmem
    num_classes = logits.shape[1]
    probs = softmax(logits, r.temperature)
    preds = {"base": probs.argmax(1)}
    for k in cfg.evaluate.knn_ks:
        preds[f"knn_{k}"] = knn_vote(nb.labels[:, :k], num_classes)
    near = nb.first(r.k)
    gate = confidence_gate(probs, r.gate, r.gate_threshold)
    preds["resmem"] = resmem_probs(probs, near.residuals, near.distances, r.sigma, gate).argmax(1)
    one_nn = nb.labels[:, 0]
    preds["oracle_gate"] = np.where(preds["base"] == labels, preds["base"], one_nn)
    return preds


METHOD_NAMES = {"base": "base model", "resmem": "ResMem", "oracle_gate": "oracle gate (base or 1-NN)"}


def method_name(key: str) -> str:
    return METHOD_NAMES.get(key) or f"{key.split('_')[1]}-NN"


def tuning_lines(tuning: dict) -> list[str]:
    lines = ["", f"## Chosen by `resmem tune` on the validation split ({tuning['trials']} "
             f"{tuning['search']} trials; base model on val: {100 * tuning['base_val_accuracy']:.2f}%)", "",
             "| k | sigma | T | gate | gate threshold | val accuracy (%) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {t['k']} | {t['sigma']:.4g} | {t['temperature']:.4g} | {t['gate']:.4g} | "
              f"{t['gate_threshold']:.4g} | {100 * t['val_accuracy']:.2f} |" for t in tuning["top"]]
    return lines + ["", "The first row is the setting evaluated on test above; test chose nothing."]


def write_report(folder, cfg: Config, metrics: dict) -> None:
    r = cfg.resmem
    acc = metrics["accuracy"]
    lines = [f"# ResMem report: {cfg.data.name}, {cfg.model.name} (width {cfg.model.width})", "",
             f"Test split: {metrics['num_test']} examples; memory: {metrics['memory_rows']} training "
             f"examples in {metrics['num_shards']} shard(s).",
             f"ResMem: k={r.k}, sigma={r.sigma}, T={r.temperature}, gate={r.gate} "
             f"(where max p < {r.gate_threshold}), "
             f"distance={r.distance}, normalize={r.normalize}.", "",
             "| method | test accuracy (%) |", "| --- | ---: |"]
    lines += [f"| {method_name(m)} | {100 * a:.2f} |" for m, a in acc.items()]
    lines += ["", "Oracle gate: per example, the base model's or the 1-NN prediction, whichever is "
              "right; an upper bound for any gate between the two, not a usable method."]
    if metrics.get("tuning"):
        lines += tuning_lines(metrics["tuning"])
    (folder / "report.md").write_text("\n".join(lines) + "\n")


def plot_accuracy_vs_k(path, cfg: Config, acc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = cfg.evaluate.knn_ks
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, [100 * acc[f"knn_{k}"] for k in ks], "o-", label="k-NN vote")
    ax.axhline(100 * acc["base"], color="gray", ls="--", label="base model")
    ax.axhline(100 * acc["resmem"], color="C2", ls="-.", label=f"ResMem (k={cfg.resmem.k})")
    ax.set_xlabel("k")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{cfg.data.name}: accuracy vs k")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(cfg: Config, tuning: dict | None = None) -> dict:
    if cfg.model.name == "gpt2_lm":  # next-token accuracy and perplexity
        from resmem_ray.lm import evaluate_lm

        return evaluate_lm(cfg)
    run = RunDir(cfg.run_dir)
    manifest = read_index_manifest(run, needed_by="evaluate")
    check_matches_index(cfg, manifest)
    test = read_split(run, "test", needed_by="evaluate", columns=("id", "label", "embedding", "logits"))
    queries = prepare_queries(test["embedding"], cfg.resmem.distance, cfg.resmem.normalize)
    if queries.shape[1] != manifest["dim"]:
        raise ResMemError(f"embedding dimension {queries.shape[1]} of {run.embeddings / 'test'} does not "
                          f"match the index in {run.index} ({manifest['dim']} dims): rerun `resmem index`")
    k_max = max([cfg.resmem.k, *cfg.evaluate.knn_ks])
    if k_max > manifest["rows"]:
        raise ResMemError(f"k={k_max} (max of resmem.k and evaluate.knn_ks) is larger than the "
                          f"memory ({manifest['rows']} rows)")
    run.mark_running("evaluate", cfg.to_dict())
    print(f"[evaluate] {len(queries)} test queries against {manifest['rows']} memory rows in "
          f"{len(manifest['shards'])} shard actor(s), k={k_max}", flush=True)
    with ShardedMemory(run.index, manifest, cfg.index) as memory:
        print(f"[evaluate] shard actors search on: {', '.join(sorted(set(memory.placement)))}", flush=True)
        nb = memory.search_batches(queries, k_max, cfg.evaluate.batch_size)
    labels = test["label"]
    preds = predictions(cfg, test["logits"], labels, nb)
    metrics = {"accuracy": {m: float((p == labels).mean()) for m, p in preds.items()},
               "num_test": int(len(labels)), "memory_rows": manifest["rows"],
               "num_shards": len(manifest["shards"]), "resmem": cfg.resmem.__dict__, "tuning": tuning}
    with atomic_dir(run.report) as tmp:
        write_json(tmp / "metrics.json", metrics)
        write_report(tmp, cfg, metrics)
        table = pa.table({"id": test["id"], "label": labels, **{m: p for m, p in preds.items()},
                          "nn1_id": nb.ids[:, 0]})
        pq.write_table(table, tmp / "predictions.parquet")
        plot_accuracy_vs_k(tmp / "accuracy_vs_k.png", cfg, metrics["accuracy"])
    run.mark_done("evaluate", cfg.to_dict(), accuracy=metrics["accuracy"])
    return metrics
