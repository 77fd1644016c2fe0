"""The report's methods, each declared once: its key (in metrics.json, predictions.parquet,
tune/best.json and every report), its title, its place in a report, the config keys its
score follows from, what `resmem tune` tunes for it on val, and its role: the base model,
a rival baseline, ResMem, or an upper bound that is no usable method (the oracle gate).

A baseline scored from the same neighbours' labels carries its function (`probs`, handed
the nearest neighbours of a search at least as deep as its own k): every task whose
prediction is a distribution scores it (classification on every example, the token LM
where the confidence gate is open), and `resmem tune` searches its `tuned` keys, each over
tune.<key>, on val at ResMem's chosen T and memory. Such a baseline is one entry here and
its test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from resmem_ray.core.resmem import knn_interpolation
from resmem_ray.errors import ResMemError


@dataclass(frozen=True)
class Method:
    key: str  # knn: one row per k of evaluate.knn_ks, keyed knn_<k>
    title: str  # {k}: the k of a knn_<k> row
    role: str  # base | rival | resmem | bound (an upper bound, not a usable method)
    reads: tuple[str, ...] = ()  # config keys its test score follows from (beside the memory's)
    tuned: dict[str, str] = field(default_factory=dict)  # resmem key -> its name in reports; tune.<key> its grid
    formula: str = ""  # for the report
    probs: Callable | None = None  # (p, neighbour labels, distances, setting) -> distribution
    titles: dict[str, str] = field(default_factory=dict)  # a task's own title (task name -> title)
    plot: bool = True  # a line of the sweep's accuracy-per-width plot


def _knn_interp(p: np.ndarray, labels: np.ndarray, distances: np.ndarray, setting: dict) -> np.ndarray:
    k = setting["knn_k"]
    if labels.shape[1] < k:
        raise ResMemError(f"kNN interpolation's k={k} (resmem.knn_k) is more than the {labels.shape[1]} "
                          "neighbours searched")
    return knn_interpolation(p, labels[:, :k], distances[:, :k], setting["knn_lambda"], setting["knn_tau"])


RESMEM_KEYS = ("resmem.k", "resmem.sigma", "resmem.gate", "resmem.gate_threshold", "resmem.gate_softness")

METHODS: dict[str, Method] = {m.key: m for m in (
    Method("base", "base model", "base"),
    Method("knn", "{k}-NN", "rival", reads=("evaluate.knn_ks",), titles={"regression": "{k}-NN regression"},
           plot=False),
    Method("knn_interp", "kNN interpolation", "rival",
           reads=("resmem.k", "resmem.knn_k", "resmem.knn_lambda", "resmem.knn_tau"),
           tuned={"knn_k": "k", "knn_lambda": "lambda", "knn_tau": "tau"}, probs=_knn_interp,
           titles={"lm": "kNN-LM"}, formula="(1 - lambda) p + lambda p_kNN, p_kNN the labels of the k nearest "
                                            "memory rows weighted by softmax(-d / tau)"),
    Method("nbr_transformer", "neighbour Transformer", "rival", reads=("neighbour_transformer.enabled",)),
    Method("resmem", "ResMem", "resmem", reads=RESMEM_KEYS),
    Method("learned_gate", "ResMem, learned gate", "resmem", plot=False),  # fitted by `resmem tune`
    Method("oracle_gate", "oracle gate (base or 1-NN)", "bound"),
)}
ORDER = tuple(METHODS)


def method(key: str) -> Method:
    """The declaration of a metrics key (knn_<k> rows are the knn method's)."""
    name = "knn" if key.startswith("knn_") and key[4:].isdigit() else key
    if name not in METHODS:
        raise ResMemError(f"no report method {key!r} (tasks/methods.py declares {', '.join(METHODS)})")
    return METHODS[name]


def title(key: str, task: str = "") -> str:
    m = method(key)
    return m.titles.get(task, m.title).format(k=key[4:] if m.key == "knn" else "")


def rank(key: str) -> tuple[int, int]:
    """Where a method's row goes in a report: ORDER, k-NN rows by k."""
    m = method(key)
    return ORDER.index(m.key), int(key[4:]) if m.key == "knn" else 0


def ordered(keys) -> list[str]:
    return sorted(keys, key=rank)


def rivals(keys) -> list[str]:
    """The rival baselines among these keys (not the base model, ResMem or an upper bound)."""
    return [key for key in keys if method(key).role == "rival"]


def plotted(keys) -> list[str]:
    return [key for key in ordered(keys) if method(key).plot]


def neighbour_baselines() -> list[Method]:
    """The baselines scored from the neighbours' labels alone (each with its `probs`)."""
    return [m for m in METHODS.values() if m.probs]


def tuned_baselines() -> list[Method]:
    """The neighbour baselines whose settings `resmem tune` chooses on val."""
    return [m for m in neighbour_baselines() if m.tuned]


def config_keys() -> tuple[str, ...]:
    """Every config key a method's test score follows from (the evaluate stage's)."""
    return tuple(dict.fromkeys(key for m in METHODS.values() for key in m.reads))


def baseline_k(resmem) -> int:
    """kNN interpolation's k: resmem.knn_k, 0 meaning ResMem's resmem.k."""
    return resmem.knn_k or resmem.k


def setting(cfg, m: Method) -> dict:
    """A baseline's setting: its tuned keys' values in cfg.resmem (knn_k resolved)."""
    return {key: baseline_k(cfg.resmem) if key == "knn_k" else getattr(cfg.resmem, key) for key in m.tuned}


def setting_record(cfg, m: Method, tuning: dict | None) -> dict:
    """What metrics.json records of a baseline's setting: its values by their report names
    and whether `resmem tune` chose them."""
    return {**{m.tuned[key]: value for key, value in setting(cfg, m).items()},
            "chosen_by": "tune" if tuning and tuning.get(m.key) else "config"}


def setting_line(m: Method, record: dict, task: str = "") -> str:
    """The report's line on how a baseline is computed and with which setting."""
    values = ", ".join(f"{short}={record[short]:.4g}" for short in m.tuned.values())
    source = ("chosen by `resmem tune` on val" if record["chosen_by"] == "tune"
              else "from " + ", ".join(f"resmem.{key}" for key in m.tuned))
    return f"{title(m.key, task)}: {m.formula}; {values} ({source})."


# --- what every report says of `resmem tune` ---------------------------------------------

# a val score: (its column in the report, its cell, a phrase with its value)
SCORES = {"val_accuracy": ("val accuracy (%)", lambda v: f"{100 * v:.2f}", lambda v: f"val accuracy {100 * v:.2f}%"),
          "val_perplexity": ("val perplexity", lambda v: f"{v:.2f}", lambda v: f"val perplexity {v:.2f}"),
          "val_rmse": ("val RMSE", lambda v: f"{v:.4f}", lambda v: f"val RMSE {v:.4f}")}
SEARCHED_NAMES = {"temperature": "T", "gate_threshold": "gate threshold", "gate_softness": "gate softness"}


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def tuning_lines(tuning: dict, task: str = "") -> list[str]:
    """The report's section on `resmem tune`'s choice: the best settings on val, the
    config's own, the tuned baselines and the learned gate."""
    keys, scores = tuning["searched"], tuning["scores"]
    phrases = lambda t: ", ".join(SCORES[s][2](t[s]) for s in scores if s in t)  # noqa: E731
    base = phrases({s: tuning[f"base_{s}"] for s in scores})
    lines = ["", f"## Chosen by `resmem tune` on the validation split ({tuning['trials']} {tuning['search']} trials, "
             f"by {tuning['objective']}; base model: {base})", "",
             "| " + " | ".join(SEARCHED_NAMES.get(k, k) for k in keys) + " | "
             + " | ".join(SCORES[s][0] for s in scores) + " |",
             "| " + " | ".join("---" if k in ("distance", "normalize") else "---:" for k in keys)
             + " |" + " ---: |" * len(scores)]
    lines += ["| " + " | ".join(_value(t[k]) for k in keys) + " | " + " | ".join(SCORES[s][1](t[s]) for s in scores)
              + " |" for t in tuning["top"]]
    lines += ["", "The first row is the setting evaluated on test above; test chose nothing."
              + (f" Plots: `tune/{scores[0]}_vs_k.png`, `tune/{tuning['heatmap']}`." if tuning.get("heatmap") else "")]
    u = tuning.get("untuned")
    if u:
        lines += ["", "The config's own setting (" + ", ".join(f"{SEARCHED_NAMES.get(k, k)}={_value(u[k])}"
                                                             for k in keys if k in u) + f"): {phrases(u)}."]
    for m in METHODS.values():
        t = tuning.get(m.key) if m.tuned else None
        if t:
            grid = " x ".join(f"tune.{key}" for key in m.tuned)
            lines += ["", f"{title(m.key, task)}, tuned on val from the same neighbour table ({t['trials']} settings "
                      f"of {grid} at the chosen T={t['temperature']:.4g}): "
                      + ", ".join(f"{short}={t[key]:.4g}" for key, short in m.tuned.items()) + f", {phrases(t)}."]
            for memory, o in t.get("other_memories", {}).items():  # tested only on the memory ResMem chose
                lines += [f"- on the {memory} memory instead (val only): "
                          + ", ".join(f"{short}={o[key]:.4g}" for key, short in m.tuned.items()) + f", {phrases(o)}."]
    if tuning.get("learned_gate"):
        g = tuning["learned_gate"]
        lines += ["", f"Learned gate: logistic regression of 'base model wrong' on {', '.join(g['features'])}, "
                  f"fitted on {g['fit_examples']} val examples ({g['fit_base_errors']} base errors); "
                  f"val accuracy {100 * g['val_accuracy']:.2f}% (in-sample)."]
    return lines
