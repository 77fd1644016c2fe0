"""Stage 4, evaluate: answer the test split from the sharded memory and report.

Methods, as in the memorization study:
  base                  argmax of the model's logits
  k-NN (k=...)          majority vote over the k nearest training examples
  neighbour Transformer the `transformer` stage's model over the query and its neighbours
  ResMem                argmax of p + gate * sum_i w_i r_i
  learned gate          argmax of p + g(x) * sum_i w_i r_i, g fitted on val by `resmem tune`
  oracle gate           per example, base or 1-NN, whichever is right (an upper bound)
Writes RUN/report/metrics.json, report.md, predictions.parquet, accuracy_vs_k.png and
per-class accuracy (per_class.png; head / tail / worst class on a long-tailed run).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resmem_ray.config import TEXT_MODELS, Config
from resmem_ray.embed import read_split
from resmem_ray.errors import ResMemError
from resmem_ray.index import prepare_queries, read_index_manifest
from resmem_ray.lookup import Neighbours, ShardedMemory
from resmem_ray.gates import gate_features, learned_gate
from resmem_ray.resmem import confidence_gate, knn_vote, memory_correction, softmax
from resmem_ray.rundir import RunDir, atomic_dir, read_json, write_json


def check_matches_index(cfg: Config, manifest: dict) -> None:
    """The query-time settings must be those the index was built with."""
    for key in ("distance", "normalize", "temperature"):
        if getattr(cfg.resmem, key) != manifest[key]:
            raise ResMemError(f"config key resmem.{key}={getattr(cfg.resmem, key)!r} differs from "
                              f"the index's {manifest[key]!r}: rerun `resmem index`")


def predictions(cfg: Config, logits: np.ndarray, labels: np.ndarray, nb: Neighbours,
                gate_params: dict | None = None) -> dict[str, np.ndarray]:
    """Each method's predicted class for every query (all but the neighbour Transformer)."""
    r = cfg.resmem
    num_classes = logits.shape[1]
    probs = softmax(logits, r.temperature)
    preds = {"base": probs.argmax(1)}
    for k in cfg.evaluate.knn_ks:
        preds[f"knn_{k}"] = knn_vote(nb.labels[:, :k], num_classes)
    near = nb.first(r.k)
    correction = memory_correction(near.residuals, near.distances, r.sigma)
    gate = confidence_gate(probs, r.gate, r.gate_threshold, r.gate_softness)
    preds["resmem"] = (probs + gate[:, None] * correction).argmax(1)
    if gate_params is not None:
        g = learned_gate(gate_params, gate_features(probs, near.labels, near.distances, correction))
        preds["learned_gate"] = (probs + g[:, None] * correction).argmax(1)
    one_nn = nb.labels[:, 0]
    preds["oracle_gate"] = np.where(preds["base"] == labels, preds["base"], one_nn)
    return preds


METHOD_NAMES = {"base": "base model", "resmem": "ResMem", "oracle_gate": "oracle gate (base or 1-NN)",
                "learned_gate": "ResMem, learned gate", "nbr_transformer": "neighbour Transformer"}
ORDER = ("base", "knn", "nbr_transformer", "resmem", "learned_gate", "oracle_gate")


def report_rank(key: str) -> int:
    return ORDER.index("knn" if key.startswith("knn_") else key)


def method_name(key: str) -> str:
    return METHOD_NAMES.get(key) or f"{key.split('_')[1]}-NN"


def per_class(labels: np.ndarray, preds: dict[str, np.ndarray], train_counts: np.ndarray) -> dict:
    """Per-class accuracy of every method; head / tail halves by train count; worst class."""
    classes = np.arange(len(train_counts))
    acc = {m: [float((p[labels == c] == c).mean()) if (labels == c).any() else float("nan") for c in classes]
           for m, p in preds.items()}
    by_count = np.argsort(-train_counts, kind="stable")
    head, tail = by_count[:len(classes) // 2], by_count[len(classes) // 2:]
    in_group = lambda group: np.isin(labels, group)  # noqa: E731
    return {"train_counts": train_counts.tolist(), "accuracy": acc,
            "head_classes": sorted(head.tolist()), "tail_classes": sorted(tail.tolist()),
            "head": {m: float((p == labels)[in_group(head)].mean()) for m, p in preds.items()},
            "tail": {m: float((p == labels)[in_group(tail)].mean()) for m, p in preds.items()},
            "worst_class": {m: float(np.nanmin(a)) for m, a in acc.items()}}


def tuning_lines(tuning: dict) -> list[str]:
    lines = ["", f"## Chosen by `resmem tune` on the validation split ({tuning['trials']} "
             f"{tuning['search']} trials; base model on val: {100 * tuning['base_val_accuracy']:.2f}%)", "",
             "| k | sigma | T | gate | gate threshold | gate softness | distance | normalize | val accuracy (%) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    lines += [f"| {t['k']} | {t['sigma']:.4g} | {t['temperature']:.4g} | {t['gate']:.4g} | "
              f"{t['gate_threshold']:.4g} | {t['gate_softness']:.4g} | {t['distance']} | {t['normalize']} | "
              f"{100 * t['val_accuracy']:.2f} |" for t in tuning["top"]]
    lines += ["", "The first row is the setting evaluated on test above; test chose nothing. "
              "Plots: `tune/val_accuracy_vs_k.png`, `tune/sigma_T_heatmap.png`."]
    if tuning.get("learned_gate"):
        g = tuning["learned_gate"]
        lines += ["", f"Learned gate: logistic regression of 'base model wrong' on {', '.join(g['features'])}, "
                  f"fitted on {g['fit_examples']} val examples ({g['fit_base_errors']} base errors); "
                  f"val accuracy {100 * g['val_accuracy']:.2f}% (in-sample)."]
    return lines


def write_report(folder, cfg: Config, metrics: dict) -> None:
    r = cfg.resmem
    acc = metrics["accuracy"]
    model = cfg.model.name if cfg.model.name in TEXT_MODELS else f"{cfg.model.name} (width {cfg.model.width})"
    lines = [f"# ResMem report: {cfg.data.name}, {model}", "",
             f"Test split: {metrics['num_test']} examples; memory: {metrics['memory_rows']} training "
             f"examples in {metrics['num_shards']} shard(s).",
             f"ResMem: k={r.k}, sigma={r.sigma}, T={r.temperature}, gate={r.gate} "
             f"(where max p < {r.gate_threshold}), "
             f"distance={r.distance}, normalize={r.normalize}.", "",
             "| method | test accuracy (%) |", "| --- | ---: |"]
    lines += [f"| {method_name(m)} | {100 * a:.2f} |" for m, a in acc.items()]
    lines += ["", "Oracle gate: per example, the base model's or the 1-NN prediction, whichever is "
              "right; an upper bound for any gate between the two, not a usable method."]
    lines += per_class_lines(metrics["per_class"], cfg)
    if metrics.get("tuning"):
        lines += tuning_lines(metrics["tuning"])
    (folder / "report.md").write_text("\n".join(lines) + "\n")


def per_class_lines(pc: dict, cfg: Config) -> list[str]:
    methods = [m for m in ("base", f"knn_{max(cfg.evaluate.knn_ks)}", "resmem") if m in pc["accuracy"]]
    lines = ["", "## Per class (test accuracy %, `per_class.png`)", "",
             "| class | train examples | " + " | ".join(method_name(m) for m in methods) + " | ResMem - base |",
             "| ---: | ---: | " + " | ".join("---:" for _ in methods) + " | ---: |"]
    for c, count in enumerate(pc["train_counts"]):
        row = [pc["accuracy"][m][c] for m in methods]
        gain = pc["accuracy"]["resmem"][c] - pc["accuracy"]["base"][c]
        lines.append(f"| {c} | {count} | " + " | ".join(f"{100 * a:.2f}" for a in row) + f" | {100 * gain:+.2f} |")
    for group in ("head", "tail", "worst_class") if cfg.data.imbalance_ratio > 1 else ("worst_class",):
        name = {"head": f"head (classes {pc['head_classes']})", "tail": f"tail (classes {pc['tail_classes']})",
                "worst_class": "worst class"}[group]
        lines.append(f"| {name} | | " + " | ".join(f"{100 * pc[group][m]:.2f}" for m in methods) + " | |")
    return lines


def plot_per_class(path, pc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = pc["accuracy"]
    classes = np.arange(len(pc["train_counts"]))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(classes)), 3.5))
    gain = 100 * (np.array(acc["resmem"]) - np.array(acc["base"]))
    ax.bar(classes, gain, color=np.where(gain >= 0, "C2", "C3"))
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(classes, [f"{c}\n({n})" for c, n in zip(classes, pc["train_counts"])], fontsize=7)
    ax.set_xlabel("class (train examples)")
    ax.set_ylabel("ResMem - base (test accuracy points)")
    ax.set_title("per-class gain of ResMem")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def stored_tuning(run: RunDir, cfg: Config) -> dict | None:
    """`resmem tune`'s summary when this config evaluates its chosen setting."""
    path = run.root / "tune" / "best.json"
    if not path.is_file():
        return None
    summary = read_json(path)
    same = all(getattr(cfg.resmem, key) == value for key, value in summary["best"].items())
    return summary if same else None


def evaluate(cfg: Config, tuning: dict | None = None) -> dict:
    if cfg.model.name == "gpt2_lm":  # next-token accuracy and perplexity
        from resmem_ray.lm import evaluate_lm

        return evaluate_lm(cfg)
    run = RunDir(cfg.run_dir)
    manifest = read_index_manifest(run, needed_by="evaluate")
    check_matches_index(cfg, manifest)
    tuning = tuning or stored_tuning(run, cfg)
    nt = cfg.neighbour_transformer
    if nt.enabled:
        run.stage_output("transformer", needed_by="evaluate (neighbour_transformer.enabled)")
    test = read_split(run, "test", needed_by="evaluate", columns=("id", "label", "embedding", "logits"))
    queries = prepare_queries(test["embedding"], cfg.resmem.distance, cfg.resmem.normalize)
    if queries.shape[1] != manifest["dim"]:
        raise ResMemError(f"embedding dimension {queries.shape[1]} of {run.embeddings / 'test'} does not "
                          f"match the index in {run.index} ({manifest['dim']} dims): rerun `resmem index`")
    k_max = max([cfg.resmem.k, *cfg.evaluate.knn_ks, nt.k if nt.enabled else 1])
    if k_max > manifest["rows"]:
        raise ResMemError(f"k={k_max} (max of resmem.k, evaluate.knn_ks and neighbour_transformer.k) is "
                          f"larger than the memory ({manifest['rows']} rows)")
    run.mark_running("evaluate", cfg.to_dict())
    print(f"[evaluate] {len(queries)} test queries against {manifest['rows']} memory rows in "
          f"{len(manifest['shards'])} shard actor(s), k={k_max}", flush=True)
    with ShardedMemory(run.index, manifest, cfg.index) as memory:
        print(f"[evaluate] shard actors search on: {', '.join(sorted(set(memory.placement)))}", flush=True)
        nb = memory.search_batches(queries, k_max, cfg.evaluate.batch_size)
    labels = test["label"]
    preds = predictions(cfg, test["logits"], labels, nb, (tuning or {}).get("learned_gate"))
    if nt.enabled:
        from resmem_ray.neighbour_transformer import transformer_predictions

        preds["nbr_transformer"] = transformer_predictions(cfg, run, queries, labels, nb)
    preds = dict(sorted(preds.items(), key=lambda item: report_rank(item[0])))
    train_counts = np.bincount(read_split(run, "train", "evaluate", ("id", "label"))["label"],
                               minlength=test["logits"].shape[1])
    metrics = {"accuracy": {m: float((p == labels).mean()) for m, p in preds.items()},
               "num_test": int(len(labels)), "memory_rows": manifest["rows"],
               "num_shards": len(manifest["shards"]), "resmem": cfg.resmem.__dict__, "tuning": tuning,
               "per_class": per_class(labels, preds, train_counts)}
    with atomic_dir(run.report) as tmp:
        write_json(tmp / "metrics.json", metrics)
        write_report(tmp, cfg, metrics)
        table = pa.table({"id": test["id"], "label": labels, **{m: p for m, p in preds.items()},
                          "nn1_id": nb.ids[:, 0]})
        pq.write_table(table, tmp / "predictions.parquet")
        plot_accuracy_vs_k(tmp / "accuracy_vs_k.png", cfg, metrics["accuracy"])
        plot_per_class(tmp / "per_class.png", metrics["per_class"])
    run.mark_done("evaluate", cfg.to_dict(), accuracy=metrics["accuracy"])
    return metrics
