"""What image and text classification share: dense residual rows in the memory, and
the evaluation of the memorization study's methods.

  base                  argmax of the model's logits
  k-NN (k=...)          majority vote over the k nearest training examples
  kNN interpolation     argmax of (1 - lambda) p + lambda p_kNN over the same resmem.k
                        neighbours (lambda, tau: resmem.knn_*, which `resmem tune` chooses on val)
  neighbour Transformer the `transformer` stage's model over the query and its neighbours
  ResMem                argmax of p + gate * sum_i w_i r_i
  learned gate          argmax of p + g(x) * sum_i w_i r_i, g fitted on val by `resmem tune`
  oracle gate           per example, base or 1-NN, whichever is right (an upper bound)

Each method is declared once in tasks/methods.py (key, title, order, role). evaluate
writes metrics.json, report.md, predictions.parquet, accuracy_vs_k.png and
per-class accuracy (per_class.png; head / tail / worst class on a long-tailed run).
The report warns at the top when the base model did not learn (train accuracy near chance).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from resmem_ray.core.gates import fit_learned_gate, gate_features, learned_gate
from resmem_ray.core.knn import Neighbours
from resmem_ray.errors import ResMemError
from resmem_ray.core.resmem import (apply_correction, confidence_gate, knn_vote, memory_correction, residuals,
                                    softmax)
from resmem_ray.runtime.trainer import chance_warning
from resmem_ray.schema import Config
from resmem_ray.store.artifacts import TableWriter, footprint_line, label_counts, read_memory_rows
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.methods import (METHODS, baseline_k, neighbour_baselines, ordered, setting, setting_line,
                                      setting_record, title, tuned_baselines, tuning_lines)
from resmem_ray.tasks.neighbour_model import transformer_predictor
from resmem_ray.tasks.registry import Scorer, Task


class ClassificationTask(Task):
    """Dense residual rows: onehot(y) - softmax(logits / T), computed at index time from
    the stored logits, so T changes the memory and not the embeddings."""

    codec = "dense"

    def memory_rows(self, cfg: Config, rows: dict, temperature: float, embedded: dict) -> dict:
        return {"residuals": residuals(rows["logits"], rows["label"], temperature), "manifest": {}}

    def lookup_k(self, cfg: Config) -> int:
        nt = cfg.neighbour_transformer
        return max([cfg.resmem.k, baseline_k(cfg.resmem), *cfg.evaluate.knn_ks, nt.k if nt.enabled else 1])

    def scorer(self, cfg: Config, run: RunDir, manifest: dict, folder, tuning: dict | None = None) -> Scorer:
        return ClassificationScorer(cfg, run, manifest, folder, self.model_title(cfg), tuning)

    def method_accuracies(self, cfg: Config, table: dict, tuning: dict | None) -> dict[str, float]:
        """Every method's accuracy but the neighbour Transformer's on a neighbour table's val
        rows (`resmem sweep` scores val this way; evaluate scores test)."""
        labels = table["val"]["label"]
        preds = predictions(cfg, table["val"]["logits"], labels, table_neighbours(table, cfg.resmem.temperature),
                            (tuning or {}).get("learned_gate"))
        return {m: float((p == labels).mean()) for m, p in preds.items()}

    # --- tune: every trial reweights one val neighbour table --------------------------
    tune_keys = ("k", "sigma", "temperature", "gate", "gate_threshold", "gate_softness", "distance", "normalize")

    def tune_table(self, cfg: Config, run: RunDir, val: dict, nb: Neighbours) -> dict:
        """The neighbours' residual rows at each T of tune.temperature and the config's own,
        computed once here from their logits (kept too when a sampled T may fall between them)."""
        logits = read_memory_rows(run, "tune", nb.ids, "logits")  # memorized rows included
        table = {"residuals_at": {t: neighbour_residuals(logits, nb.labels, t)
                                  for t in dict.fromkeys([*cfg.tune.temperature, cfg.resmem.temperature])}}
        return table if cfg.tune.search == "grid" else {**table, "neighbour_logits": logits}

    def val_scores(self, cfg: Config, table: dict, methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
        r, val = cfg.resmem, table["val"]
        probs = softmax(val["logits"], r.temperature)
        nb = table_neighbours(table, r.temperature) if set(methods) - {"base"} else None
        out = {}
        for key in methods:
            if key == "base":
                scored = probs
            elif key == "resmem":
                scored = resmem_prediction(cfg, probs, nb.first(r.k))[0]
            else:
                scored = METHODS[key].probs(probs, nb.labels, nb.distances, setting(cfg, METHODS[key]))
            out[key] = {"val_accuracy": float((scored.argmax(1) == val["label"]).mean())}
        return out

    def tuned_baselines(self) -> list:
        return tuned_baselines()

    def fit_on_val(self, cfg: Config, table: dict) -> dict:
        return {"learned_gate": fit_gate_on_val(cfg, table)} if cfg.tune.learned_gate else {}

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


def neighbour_residuals(logits: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    """(n, k, C) residual rows at T of neighbours with (n, k, C) logits and (n, k) labels."""
    n, k, c = logits.shape
    return residuals(logits.reshape(-1, c), labels.ravel(), temperature).reshape(n, k, c)


def table_neighbours(table: dict, temperature: float) -> Neighbours:
    """A val neighbour table's neighbours with their residual rows at T."""
    nb = table["neighbours"]
    at = table["residuals_at"].get(temperature)
    if at is None:
        at = neighbour_residuals(table["neighbour_logits"], nb.labels, temperature)
    return Neighbours(nb.distances, nb.ids, nb.labels, at)


def fit_gate_on_val(cfg: Config, table: dict) -> dict:
    """The learned gate at cfg's k, sigma, T, with its (in-sample) val accuracy."""
    r, val = cfg.resmem, table["val"]
    near = table_neighbours(table, r.temperature).first(r.k)
    base = softmax(val["logits"], r.temperature)
    correction = memory_correction(near.residuals, near.distances, r.sigma)
    features = gate_features(base, near.labels, near.distances, correction)
    params = fit_learned_gate(features, base.argmax(1) != val["label"])
    g = learned_gate(params, features)
    params["val_accuracy"] = float((apply_correction(base, correction, g).argmax(1) == val["label"]).mean())
    return params


def predictions(cfg: Config, logits: np.ndarray, labels: np.ndarray, nb: Neighbours,
                gate_params: dict | None = None) -> dict[str, np.ndarray]:
    """Each method's predicted class for every query (all but the neighbour Transformer);
    the neighbour baselines at their settings in cfg.resmem."""
    r = cfg.resmem
    num_classes = logits.shape[1]
    probs = softmax(logits, r.temperature)
    preds = {"base": probs.argmax(1)}
    for k in cfg.evaluate.knn_ks:
        preds[f"knn_{k}"] = knn_vote(nb.labels[:, :k], num_classes)
    near = nb.first(r.k)
    for m in neighbour_baselines():
        preds[m.key] = m.probs(probs, nb.labels, nb.distances, setting(cfg, m)).argmax(1)
    preds["resmem"] = resmem_prediction(cfg, probs, near)[0].argmax(1)
    if gate_params is not None:
        correction = memory_correction(near.residuals, near.distances, r.sigma)
        g = learned_gate(gate_params, gate_features(probs, near.labels, near.distances, correction))
        preds["learned_gate"] = apply_correction(probs, correction, g).argmax(1)
    one_nn = nb.labels[:, 0]
    preds["oracle_gate"] = np.where(preds["base"] == labels, preds["base"], one_nn)
    return preds


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


def write_report(folder, cfg: Config, metrics: dict, model_title: str) -> None:
    r = cfg.resmem
    acc = metrics["accuracy"]
    lines = [f"# ResMem report: {cfg.data.name}, {model_title}", ""]
    lines += [line for w in metrics.get("warnings", []) for line in (f"> **Warning:** {w}", "")]
    lines += [f"Test split: {metrics['num_test']} examples (one example is {100 / metrics['num_test']:.2f} "
              f"points); memory: {metrics['memory_rows']} training examples in {metrics['num_shards']} shard(s), "
              f"{metrics['memory_footprint']}.",
              f"ResMem: k={r.k}, sigma={r.sigma}, T={r.temperature}, gate={r.gate} "
              f"(where max p < {r.gate_threshold}), "
              f"distance={r.distance}, normalize={r.normalize}."]
    lines += [setting_line(m, metrics[m.key]) for m in neighbour_baselines() if m.key in acc]
    lines += ["", "| method | test accuracy (%) | vs base (points, 95% CI) | fixed / broken |",
              "| --- | ---: | ---: | ---: |"]
    for m, a in acc.items():
        c = metrics["vs_base"].get(m)
        vs = " | " if c is None else (f"{100 * c['change']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}] | "
                                      f"{c['fixed']} / {c['broken']}")
        lines.append(f"| {title(m)} | {100 * a:.2f} | {vs} |")
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
             "| class | train examples | " + " | ".join(title(m) for m in methods) + " | ResMem - base |",
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
    for i, m in enumerate(m for m in neighbour_baselines() if m.key in acc):
        ax.axhline(100 * acc[m.key], color=f"C{2 * i + 1}", ls=":", label=f"{m.title} (k={cfg.resmem.k})")
    ax.axhline(100 * acc["resmem"], color="C2", ls="-.", label=f"ResMem (k={cfg.resmem.k})")
    ax.set_xlabel("k")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{cfg.data.name}: accuracy vs k")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class ClassificationScorer(Scorer):
    """Every method's test predictions and accuracy, chunk by chunk: predictions.parquet
    gets a row group per chunk; the driver keeps each test row's label and predicted class
    per method (a byte or two each), from which finish() computes the metrics and writes
    the report files into `folder`."""

    def __init__(self, cfg: Config, run: RunDir, manifest: dict, folder, title: str, tuning: dict | None):
        self.cfg, self.run, self.manifest, self.folder = cfg, run, manifest, folder
        self.title, self.tuning = title, tuning
        self.transformer = transformer_predictor(run) if cfg.neighbour_transformer.enabled else None
        self.kept, self.num_classes = [], manifest["num_classes"]
        self.predictions = TableWriter(folder / "predictions.parquet")

    def add(self, rows: dict, queries, nb: Neighbours, reads) -> None:
        labels = rows["label"]
        preds = predictions(self.cfg, rows["logits"], labels, nb, (self.tuning or {}).get("learned_gate"))
        if self.transformer:
            preds["nbr_transformer"] = self.transformer(queries, labels, nb)
        small = np.int16 if self.num_classes < 2 ** 15 else np.int32
        self.predictions.write(pa.table({"id": rows["id"], "label": labels, **{m: preds[m] for m in ordered(preds)},
                                         "nn1_id": nb.ids[:, 0]}))
        self.kept.append({"label": labels.astype(small), **{m: p.astype(small) for m, p in preds.items()}})

    def finish(self) -> dict:
        self.predictions.close()
        cfg, kept = self.cfg, {c: np.concatenate([k[c] for k in self.kept]) for c in self.kept[0]}
        labels = kept.pop("label")
        preds = {m: kept[m] for m in ordered(kept)}
        right = {m: p == labels for m, p in preds.items()}
        metrics = {"accuracy": {m: float(r.mean()) for m, r in right.items()},
                   "vs_base": {m: paired_change(r, right["base"]) for m, r in right.items() if m != "base"},
                   "num_test": int(len(labels)), "memory_rows": self.manifest["rows"],
                   "num_shards": len(self.manifest["shards"]), "memory_footprint": footprint_line(self.manifest),
                   "resmem": cfg.resmem.__dict__, "tuning": self.tuning,
                   **{m.key: setting_record(cfg, m, self.tuning) for m in neighbour_baselines()},
                   "warnings": training_warnings(self.run, self.num_classes),
                   "per_class": per_class(labels, preds, label_counts(self.run, "train", "evaluate", self.num_classes))}
        write_report(self.folder, cfg, metrics, self.title)
        plot_accuracy_vs_k(self.folder / "accuracy_vs_k.png", cfg, metrics["accuracy"])
        plot_per_class(self.folder / "per_class.png", metrics["per_class"])
        return metrics
