"""What image and text classification share: dense residual rows in the memory, and
the evaluation of the memorization study's methods.

  base                  argmax of the model's logits
  k-NN (k=...)          majority vote over the k nearest training examples
  kNN interpolation     argmax of (1 - lambda) p + lambda p_kNN over the same resmem.k
                        neighbours (lambda, tau: resmem.knn_*, or `resmem tune`'s choice on val)
  neighbour Transformer the `transformer` stage's model over the query and its neighbours
  ResMem                argmax of p + gate * sum_i w_i r_i
  learned gate          argmax of p + g(x) * sum_i w_i r_i, g fitted on val by `resmem tune`
  oracle gate           per example, base or 1-NN, whichever is right (an upper bound)

evaluate writes metrics.json, report.md, predictions.parquet, accuracy_vs_k.png and
per-class accuracy (per_class.png; head / tail / worst class on a long-tailed run).
The report warns at the top when the base model did not learn (train accuracy near chance).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resmem_ray.core.gates import gate_features, learned_gate
from resmem_ray.core.knn import Neighbours
from resmem_ray.errors import ResMemError
from resmem_ray.core.resmem import (apply_correction, confidence_gate, knn_interpolation, knn_vote, memory_correction,
                                    residuals, softmax)
from resmem_ray.runtime.trainer import chance_warning
from resmem_ray.schema import Config
from resmem_ray.store.artifacts import read_split
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.neighbour_model import transformer_predictions
from resmem_ray.tasks.registry import Task


class ClassificationTask(Task):
    """Dense residual rows: onehot(y) - softmax(logits / T), computed at index time from
    the stored logits, so T changes the memory and not the embeddings."""

    codec = "dense"

    def memory_rows(self, cfg: Config, rows: dict, temperature: float, embedded: dict) -> dict:
        return {"residuals": residuals(rows["logits"], rows["label"], temperature), "manifest": {}, "info": {}}

    def lookup_k(self, cfg: Config) -> int:
        nt = cfg.neighbour_transformer
        return max([cfg.resmem.k, *cfg.evaluate.knn_ks, nt.k if nt.enabled else 1])

    def evaluate(self, cfg: Config, run: RunDir, test: dict, queries, nb, manifest: dict, folder,
                 tuning: dict | None = None) -> dict:
        return evaluate_classification(cfg, run, test, queries, nb, manifest, folder, self.model_title(cfg), tuning)

    def method_accuracies(self, cfg: Config, logits: np.ndarray, labels: np.ndarray, nb: Neighbours,
                          tuning: dict | None) -> dict[str, float]:
        """Every method's accuracy but the neighbour Transformer's on rows with neighbours nb
        (`resmem sweep` scores val this way; evaluate scores test)."""
        preds = predictions(cfg, logits, labels, nb, (tuning or {}).get("learned_gate"), knn_setting(cfg, tuning))
        return {m: float((p == labels).mean()) for m, p in preds.items()}

    def model_title(self, cfg: Config) -> str:
        return cfg.model.name

    def serve_labels(self, labels, count: int, meta: dict) -> np.ndarray:
        if not isinstance(labels, list) or len(labels) != count:
            raise ResMemError(f"labels must be a list of {count} class numbers, one per example")
        for i, y in enumerate(labels):
            if not isinstance(y, int) or isinstance(y, bool) or not 0 <= y < meta["num_classes"]:
                raise ResMemError(f"labels[{i}]={y!r} is not a class of this run (0..{meta['num_classes'] - 1})")
        return np.asarray(labels, dtype=np.int64)

    def serve_answers(self, cfg: Config, logits: np.ndarray, nb: Neighbours) -> list[dict]:
        probs = softmax(logits, cfg.resmem.temperature)
        corrected, gate = resmem_prediction(cfg, probs, nb.first(cfg.resmem.k))
        return [{"base": {"class": int(p.argmax()), "probs": p.tolist()},
                 "resmem": {"class": int(c.argmax()), "probs": c.tolist()}, "gate": float(g),
                 "neighbours": [{"id": int(i), "label": int(y), "distance": float(d)}
                                for i, y, d in zip(nb.ids[n], nb.labels[n], nb.distances[n])]}
                for n, (p, c, g) in enumerate(zip(probs, corrected, gate))]


def resmem_prediction(cfg: Config, probs: np.ndarray, near: Neighbours) -> tuple[np.ndarray, np.ndarray]:
    """ResMem's probabilities p + gate * sum_i w_i r_i over the neighbours `near`, and the
    gate applied to each row (resmem.gate, gate_threshold, gate_softness)."""
    r = cfg.resmem
    gate = confidence_gate(probs, r.gate, r.gate_threshold, r.gate_softness)
    return apply_correction(probs, memory_correction(near.residuals, near.distances, r.sigma), gate), gate


def knn_setting(cfg: Config, tuning: dict | None) -> dict:
    """The kNN interpolation's lambda and tau: `resmem tune`'s choice on val when this
    evaluates its setting, else resmem.knn_lambda / knn_tau."""
    if tuning and tuning.get("knn_interp"):
        t = tuning["knn_interp"]
        return {"lambda": t["knn_lambda"], "tau": t["knn_tau"], "k": cfg.resmem.k, "chosen_by": "tune"}
    return {"lambda": cfg.resmem.knn_lambda, "tau": cfg.resmem.knn_tau, "k": cfg.resmem.k, "chosen_by": "config"}


def predictions(cfg: Config, logits: np.ndarray, labels: np.ndarray, nb: Neighbours,
                gate_params: dict | None = None, knn: dict | None = None) -> dict[str, np.ndarray]:
    """Each method's predicted class for every query (all but the neighbour Transformer).
    `knn`: the kNN interpolation's setting (knn_setting); None: the config's."""
    r = cfg.resmem
    num_classes = logits.shape[1]
    probs = softmax(logits, r.temperature)
    preds = {"base": probs.argmax(1)}
    for k in cfg.evaluate.knn_ks:
        preds[f"knn_{k}"] = knn_vote(nb.labels[:, :k], num_classes)
    near = nb.first(r.k)
    knn = knn or knn_setting(cfg, None)
    preds["knn_interp"] = knn_interpolation(probs, near.labels, near.distances, knn["lambda"], knn["tau"]).argmax(1)
    preds["resmem"] = resmem_prediction(cfg, probs, near)[0].argmax(1)
    if gate_params is not None:
        correction = memory_correction(near.residuals, near.distances, r.sigma)
        g = learned_gate(gate_params, gate_features(probs, near.labels, near.distances, correction))
        preds["learned_gate"] = apply_correction(probs, correction, g).argmax(1)
    one_nn = nb.labels[:, 0]
    preds["oracle_gate"] = np.where(preds["base"] == labels, preds["base"], one_nn)
    return preds


METHOD_NAMES = {"base": "base model", "resmem": "ResMem", "oracle_gate": "oracle gate (base or 1-NN)",
                "learned_gate": "ResMem, learned gate", "nbr_transformer": "neighbour Transformer",
                "knn_interp": "kNN interpolation"}
ORDER = ("base", "knn", "knn_interp", "nbr_transformer", "resmem", "learned_gate", "oracle_gate")


def report_rank(key: str) -> tuple[int, int]:
    """Where a method's row goes in a report: ORDER, k-NN rows by k."""
    k = key.removeprefix("knn_")
    return (ORDER.index("knn"), int(k)) if k.isdigit() else (ORDER.index(key), 0)


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
    if tuning.get("knn_interp"):
        t = tuning["knn_interp"]
        lines += ["", f"kNN interpolation, tuned on val from the same neighbour table ({t['trials']} settings of "
                  f"tune.knn_lambda x tune.knn_tau at the chosen k={t['k']}, T={t['temperature']:.4g}): "
                  f"lambda={t['knn_lambda']:.4g}, tau={t['knn_tau']:.4g}, val accuracy {100 * t['val_accuracy']:.2f}%."]
    if tuning.get("learned_gate"):
        g = tuning["learned_gate"]
        lines += ["", f"Learned gate: logistic regression of 'base model wrong' on {', '.join(g['features'])}, "
                  f"fitted on {g['fit_examples']} val examples ({g['fit_base_errors']} base errors); "
                  f"val accuracy {100 * g['val_accuracy']:.2f}% (in-sample)."]
    return lines


def write_report(folder, cfg: Config, metrics: dict, title: str) -> None:
    r = cfg.resmem
    acc = metrics["accuracy"]
    knn = metrics["knn_interp"]
    lines = [f"# ResMem report: {cfg.data.name}, {title}", ""]
    lines += [line for w in metrics.get("warnings", []) for line in (f"> **Warning:** {w}", "")]
    lines += [f"Test split: {metrics['num_test']} examples (one example is {100 / metrics['num_test']:.2f} "
              f"points); memory: {metrics['memory_rows']} training examples in {metrics['num_shards']} shard(s).",
              f"ResMem: k={r.k}, sigma={r.sigma}, T={r.temperature}, gate={r.gate} "
              f"(where max p < {r.gate_threshold}), "
              f"distance={r.distance}, normalize={r.normalize}.",
              f"kNN interpolation: (1 - lambda) p + lambda p_kNN over the same k={knn['k']} neighbours, "
              f"p_kNN their labels weighted by softmax(-d / tau); lambda={knn['lambda']:.4g}, tau={knn['tau']:.4g} "
              f"({'chosen by `resmem tune` on val' if knn['chosen_by'] == 'tune' else 'from resmem.knn_lambda, resmem.knn_tau'}).",
              "", "| method | test accuracy (%) | vs base (points, 95% CI) | fixed / broken |",
              "| --- | ---: | ---: | ---: |"]
    for m, a in acc.items():
        c = metrics["vs_base"].get(m)
        vs = " | " if c is None else (f"{100 * c['change']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}] | "
                                      f"{c['fixed']} / {c['broken']}")
        lines.append(f"| {method_name(m)} | {100 * a:.2f} | {vs} |")
    lines += ["", "vs base: the change in test accuracy, with a 95% interval over the test examples "
              "(paired: each example is right or wrong under both); an interval that excludes 0 is a "
              "change beyond the test set's sampling noise. Fixed / broken: test examples the base model "
              "got wrong and the method right, and the reverse.",
              "", "Oracle gate: per example, the base model's or the 1-NN prediction, whichever is "
              "right; an upper bound for any gate between the two, not a usable method."]
    lines += per_class_lines(metrics["per_class"], cfg)
    if metrics.get("tuning"):
        lines += tuning_lines(metrics["tuning"])
    (folder / "report.md").write_text("\n".join(lines) + "\n")


def paired_change(right: np.ndarray, base_right: np.ndarray) -> dict:
    """A method's change in accuracy over the base model on the same examples, with a 95%
    normal interval of the mean paired difference (per example -1, 0 or +1)."""
    diff = right.astype(np.float64) - base_right
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    change = float(diff.mean())
    return {"change": change, "low": change - half, "high": change + half,
            "fixed": int((diff > 0).sum()), "broken": int((diff < 0).sum())}


def training_warnings(run: RunDir, num_classes: int) -> list[str]:
    """The report's warnings about the base model (runtime.trainer.chance_warning on
    RUN/model/history.json)."""
    path = run.model / "history.json"
    warning = chance_warning(json.loads(path.read_text()), num_classes) if path.is_file() else None
    return [warning] if warning else []


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
    ax.axhline(100 * acc["knn_interp"], color="C1", ls=":", label=f"kNN interpolation (k={cfg.resmem.k})")
    ax.axhline(100 * acc["resmem"], color="C2", ls="-.", label=f"ResMem (k={cfg.resmem.k})")
    ax.set_xlabel("k")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{cfg.data.name}: accuracy vs k")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_classification(cfg: Config, run: RunDir, test: dict, queries: np.ndarray, nb: Neighbours,
                            manifest: dict, folder, title: str, tuning: dict | None) -> dict:
    """Every method's test predictions and accuracy; the report files into `folder`."""
    labels = test["label"]
    knn = knn_setting(cfg, tuning)
    preds = predictions(cfg, test["logits"], labels, nb, (tuning or {}).get("learned_gate"), knn)
    if cfg.neighbour_transformer.enabled:
        preds["nbr_transformer"] = transformer_predictions(run, queries, labels, nb)
    preds = dict(sorted(preds.items(), key=lambda item: report_rank(item[0])))
    train_counts = np.bincount(read_split(run, "train", "evaluate", ("id", "label"))["label"],
                               minlength=test["logits"].shape[1])
    right = {m: p == labels for m, p in preds.items()}
    metrics = {"accuracy": {m: float(r.mean()) for m, r in right.items()},
               "vs_base": {m: paired_change(r, right["base"]) for m, r in right.items() if m != "base"},
               "num_test": int(len(labels)), "memory_rows": manifest["rows"],
               "num_shards": len(manifest["shards"]), "resmem": cfg.resmem.__dict__, "tuning": tuning,
               "knn_interp": knn, "warnings": training_warnings(run, test["logits"].shape[1]),
               "per_class": per_class(labels, preds, train_counts)}
    write_report(folder, cfg, metrics, title)
    table = pa.table({"id": test["id"], "label": labels, **{m: p for m, p in preds.items()}, "nn1_id": nb.ids[:, 0]})
    pq.write_table(table, folder / "predictions.parquet")
    plot_accuracy_vs_k(folder / "accuracy_vs_k.png", cfg, metrics["accuracy"])
    plot_per_class(folder / "per_class.png", metrics["per_class"])
    return metrics
