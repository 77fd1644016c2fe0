"""Regenerate docs/results.md: run each experiment with the suite's own commands, time
them, and write the tables from the runs' own reports.

    python benchmarks/results_doc.py                  # every experiment, then the document
    python benchmarks/results_doc.py --only bbc_lm    # one experiment, then the document
    python benchmarks/results_doc.py --render         # the document from the recorded runs

Each experiment's figures and wall times are recorded in docs/results/<name>.json (and
its plots copied beside it), so one experiment can be rerun alone. Fashion-MNIST needs
the Debian package dataset-fashion-mnist (`make fashion-mnist` installs it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine  # noqa: E402

from resmem_ray import versions  # noqa: E402
from resmem_ray.stages.tune import memory_key  # noqa: E402
from resmem_ray.tasks.methods import method, ordered, rivals, title  # noqa: E402

DOCS = Path("docs")
RECORDS = DOCS / "results"

LM_SEEDS = (0, 1, 2)  # the LM's figures are a mean and a spread over these seeds
# the memory's other layer on the first seed: the same base model, trained again from the
# same seed, embedded at the last block's input
LM_LAYER_RUN = "runs/bbc_lm/last_block_input"
LM_LAYER = ["--config", "jobs/configs/bbc_lm.yaml", f"seed={LM_SEEDS[0]}", f"run_dir={LM_LAYER_RUN}",
            "text.lm_embedding=last_block_input"]

# name -> (title, run directory, the commands in order)
EXPERIMENTS = {
    "digits": ("The embedded default (`make run`): digits, a small CNN trained 3 epochs", "runs/digits",
               [["run", "--config", "jobs/configs/digits.yaml"]]),
    "fashion_mnist_sweep": ("Fashion-MNIST: base-model width sweep, 4 widths x 3 seeds", "runs/fashion_mnist_sweep",
                            [["sweep", "--config", "jobs/configs/fashion_mnist_sweep.yaml"]]),
    "fashion_mnist_lt": ("Long-tailed Fashion-MNIST (imbalance ratio 100)", "runs/fashion_mnist_lt",
                         [["run", "--config", "jobs/configs/fashion_mnist_lt.yaml"],
                          ["tune", "--config", "jobs/configs/fashion_mnist_lt.yaml"]]),
    "bbc_news": ("BBC News: MiniLM classifier (encoder frozen)", "runs/bbc_news",
                 [["run", "--config", "jobs/configs/bbc_news.yaml"],
                  ["tune", "--config", "jobs/configs/bbc_news.yaml"]]),
    "bbc_lm": ("BBC News GPT-2 language model: token-level memory, ResMem against the textbook kNN-LM", "runs/bbc_lm",
               [[command, "--config", "jobs/configs/bbc_lm.yaml", f"seed={seed}", f"run_dir=runs/bbc_lm/seed{seed}"]
                for seed in LM_SEEDS for command in ("run", "tune")] + [["run", *LM_LAYER], ["tune", *LM_LAYER]]),
}


def run_experiment(name: str) -> None:
    title, run_dir, commands = EXPERIMENTS[name]
    shutil.rmtree(run_dir, ignore_errors=True)  # from nothing, so the wall times mean what they say
    timed = []
    for args in commands:
        print(f"[results] {name}: resmem {' '.join(args)}", flush=True)
        start = time.perf_counter()
        subprocess.run([str(Path(sys.executable).with_name("resmem")), *args], check=True)
        timed.append({"command": "resmem " + " ".join(args), "seconds": time.perf_counter() - start})
    run = Path(run_dir)
    record = {"name": name, "title": title, "commands": timed, "machine": machine(), "versions": versions(),
              "date": time.strftime("%Y-%m-%d")}
    RECORDS.mkdir(parents=True, exist_ok=True)
    if name == "bbc_lm":
        from lm_rivals import separation

        record["seeds"] = [{"seed": seed, "metrics": json.loads((run / f"seed{seed}" / "report" / "metrics.json")
                                                                .read_text())} for seed in LM_SEEDS]
        record["separation"] = separation("jobs/configs/bbc_lm.yaml", str(run / f"seed{LM_SEEDS[0]}"))
        record["last_block_input"] = json.loads((Path(LM_LAYER_RUN) / "report" / "metrics.json").read_text())
    elif name == "fashion_mnist_sweep":
        record["sweep"] = json.loads((run / "sweep" / "summary" / "results.json").read_text())
        shutil.copy(run / "sweep" / "summary" / "width_sweep.png", RECORDS / f"{name}.png")
    else:
        record["metrics"] = json.loads((run / "report" / "metrics.json").read_text())
        if (run / "report" / "per_class.png").is_file():
            shutil.copy(run / "report" / "per_class.png", RECORDS / f"{name}_per_class.png")
    tmp = RECORDS / f".{name}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=float))
    tmp.replace(RECORDS / f"{name}.json")


# --- rendering ------------------------------------------------------------------------

def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def commands_lines(record: dict) -> list[str]:
    return [f"Commands (wall time on {record['machine']}, {record['date']}):", ""] + [
        f"    {c['command']}    # {minutes(c['seconds'])}" for c in record["commands"]] + [""]


def best_baseline(acc: dict) -> tuple[str, float]:
    m = max(rivals(acc), key=acc.get)
    return m, acc[m]


def verdict(acc: dict) -> str:
    """One plain sentence: does ResMem beat the base model and the best baseline?"""
    m, a = best_baseline(acc)
    gain = 100 * (acc["resmem"] - acc["base"])
    against = (f"and beats the best baseline, {title(m)} ({100 * a:.2f}%), by {100 * (acc['resmem'] - a):.2f} "
               "points" if acc["resmem"] > a else
               f"but does **not** beat {title(m)} ({100 * a:.2f}% against ResMem's {100 * acc['resmem']:.2f}%)")
    return f"ResMem changes test accuracy by {gain:+.2f} points over the base model {against}."


def classification_lines(record: dict) -> list[str]:
    m = record["metrics"]
    acc, vs = m["accuracy"], m["vs_base"]
    lines = [f"{m['num_test']} test examples (one is {100 / m['num_test']:.2f} points); a memory of "
             f"{m['memory_rows']} training examples.", ""]
    t = m.get("tuning")
    r = m["resmem"]
    lines += [f"ResMem: k={r['k']}, sigma={r['sigma']:g}, T={r['temperature']:g}, gate={r['gate']:g}" +
              (f", chosen by `resmem tune` on val ({t['trials']} settings)" if t else " (the config's setting)") +
              f"; kNN interpolation: lambda={m['knn_interp']['lambda']:g}, tau={m['knn_interp']['tau']:g}.", "",
              "| method | test accuracy (%) | vs base (points, 95% CI) | fixed / broken |",
              "| --- | ---: | ---: | ---: |"]
    for key in ordered(acc):
        c = vs.get(key)
        change = " | " if c is None else (f"{100 * c['change']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]"
                                          f" | {c['fixed']} / {c['broken']}")
        lines.append(f"| {title(key)} | {100 * acc[key]:.2f} | {change} |")
    lines += ["", verdict(acc), ""]
    for w in m.get("warnings", []):
        lines += [f"> Warning from the report: {w}", ""]
    return lines


def long_tail_lines(record: dict) -> list[str]:
    pc = record["metrics"]["per_class"]
    keys = ordered(pc["head"])
    knn = [x for x in keys if method(x).key == "knn"]
    methods = [x for x in keys if method(x).key != "knn" or x in (knn[0], knn[-1])]  # k-NN: smallest and largest k
    lines = ["| group | train examples | " + " | ".join(title(x) for x in methods) + " |",
             "| --- | ---: |" + " ---: |" * len(methods)]
    counts = pc["train_counts"]
    for group, classes in (("head", pc["head_classes"]), ("tail", pc["tail_classes"])):
        lines.append(f"| {group} (classes {classes}) | {sum(counts[c] for c in classes)} | " +
                     " | ".join(f"{100 * pc[group][x]:.2f}" for x in methods) + " |")
    lines.append("| worst class | | " + " | ".join(f"{100 * pc['worst_class'][x]:.2f}" for x in methods) + " |")
    return ["Per group (test accuracy %; val and test are balanced):", "", *lines,
            "", f"![per-class gain](results/{record['name']}_per_class.png)", ""]


def sweep_lines(record: dict) -> list[str]:
    groups = record["sweep"]["groups"]
    lines = []
    for split in ("test", "val"):
        methods = ordered({x for g in groups for x in g[split]})
        lines += [f"{split.capitalize()} accuracy (%), mean ± standard deviation over seeds:", "",
                  "| method | " + " | ".join(f"width {g['width']}" for g in groups) + " |",
                  "| --- |" + " ---: |" * len(groups)]
        for x in methods:
            lines.append(f"| {title(x)} | " + " | ".join(
                f"{100 * g[split][x]['mean']:.2f} ± {100 * g[split][x]['std']:.2f}" if x in g[split] else ""
                for g in groups) + " |")
        lines.append("| **ResMem - base (points)** | " + " | ".join(
            f"**{100 * g[f'{split}_gain']['mean']:+.2f} ± {100 * g[f'{split}_gain']['std']:.2f}**" for g in groups)
            + " |")
        lines.append("| seeds | " + " | ".join(str(len(g["seeds"])) for g in groups) + " |")
        lines.append("")
    lines += [f"![gain versus width](results/{record['name']}.png)", ""]
    for g in groups:
        acc = {x: s["mean"] for x, s in g["test"].items()}
        lines.append(f"- width {g['width']}: {verdict(acc)}")
    return lines + ["", "On val, ResMem, kNN interpolation and the learned gate are scored on the split that "
                    "chose their settings, so val flatters them; test chose nothing.", ""]


LM_METHODS = (("base", "base model"), ("knn_interp", "kNN-LM"), ("resmem", "ResMem"))


def lm_settings(key: str, m: dict) -> str:
    r = m["resmem"]
    memory = memory_key(r["distance"], r["normalize"])
    if key == "resmem":
        return f"k={r['k']}, sigma={r['sigma']:g}, gate={r['gate']:g}; {memory}"
    if key == "knn_interp":
        b = m["knn_interp"]
        return f"k={b['k']}, lambda={b['lambda']:g}, tau={b['tau']:g}; {memory}"
    return ""


def lm_lines(record: dict) -> list[str]:
    seeds = record["seeds"]
    first = seeds[0]["metrics"]
    lines = [f"{first['base_model']}; {first['num_test_tokens']:,} test tokens, a memory of {first['memory_rows']:,} "
             f"training tokens, residual storage {first['sparse_bytes'] / 2**20:.1f} MiB sparse (top-{first['top_m']}) "
             f"against {first['dense_bytes'] / 2**20:.0f} MiB as dense rows. Per seed (`seed=`: the tokenizer, the "
             "model's weights and data order), `resmem tune` chose every setting on val over the same space for "
             "both methods: k up to 1024 and the kernel temperature (sigma, tau) on two memories, squared L2 on the "
             "raw hidden states (kNN-LM's, Khandelwal et al. 2020) and cosine; ResMem's gate and kNN-LM's lambda.",
             "", "| method | test perplexity, mean (min-max) | test next-token accuracy (%), mean (min-max) |",
             "| --- | ---: | ---: |"]
    ppl = {key: np.array([s["metrics"][f"{key}_perplexity"] for s in seeds]) for key, _ in LM_METHODS}
    acc = {key: 100 * np.array([s["metrics"][f"{key}_accuracy"] for s in seeds]) for key, _ in LM_METHODS}
    lines += [f"| {name} | {ppl[key].mean():.2f} ({ppl[key].min():.2f}-{ppl[key].max():.2f}) | "
              f"{acc[key].mean():.2f} ({acc[key].min():.2f}-{acc[key].max():.2f}) |" for key, name in LM_METHODS]
    lines += ["", "| seed | method | settings (chosen on val) | val perplexity | test perplexity | test next-token "
              "accuracy (%) |", "| ---: | --- | --- | ---: | ---: | ---: |"]
    for s in seeds:
        m = s["metrics"]
        t = m["tuning"]
        val = {"base": t["base_val_perplexity"], "resmem": t["best_val_perplexity"],
               "knn_interp": t["knn_interp"]["val_perplexity"]}
        lines += [f"| {s['seed']} | {name} | {lm_settings(key, m)} | {val[key]:.2f} | {m[f'{key}_perplexity']:.2f} | "
                  f"{100 * m[f'{key}_accuracy']:.2f} |" for key, name in LM_METHODS]
    gap = ppl["resmem"] - ppl["knn_interp"]
    winner = ("ResMem beats kNN-LM" if gap.mean() < 0 else "kNN-LM beats ResMem")
    lines += ["", f"**{winner}** on test perplexity by {abs(gap.mean()):.2f} points on average (ResMem minus kNN-LM "
              f"per seed: {', '.join(f'{g:+.2f}' for g in gap)}); both cut the base model's perplexity by "
              f"{100 * (1 - ppl['resmem'].mean() / ppl['base'].mean()):.0f}% (ResMem) and "
              f"{100 * (1 - ppl['knn_interp'].mean() / ppl['base'].mean()):.0f}% (kNN-LM).", ""]
    others = [(s["seed"], key, o) for s in seeds
              for key, o in s["metrics"]["tuning"]["knn_interp"].get("other_memories", {}).items()]
    if others:
        lines += ["Both are tested on the memory ResMem chose on val; kNN-LM's best on the other memory, on val: "
                  + "; ".join(f"seed {seed}, {key}: {o['val_perplexity']:.2f} (k={o['knn_k']}, lambda="
                              f"{o['knn_lambda']:g}, tau={o['knn_tau']:g})" for seed, key, o in others) + ".", ""]
    f = record.get("separation")
    if f:
        lines += [f"**What separates them** (`python benchmarks/lm_rivals.py --run runs/bbc_lm/seed{seeds[0]['seed']}`): "
                  "before its clip and renormalisation, ResMem at gate = lambda and sigma = tau is "
                  "`p + lambda (p_kNN - sum_i w_i p_i)` and kNN-LM is `p + lambda (p_kNN - p)`: they differ only in "
                  "what is taken away, the neighbours' own predictions or the query's p. On seed "
                  f"{seeds[0]['seed']}'s {f['val_tokens']:,} val tokens and the same neighbours: kNN-LM "
                  f"{f['knn']:.2f}, ResMem at kNN-LM's k, kernel and weight {f['resmem_at_knn']:.2f}, ResMem as tuned "
                  f"{f['resmem']:.2f} (base {f['base']:.2f}).", ""]
        if "dense_rows" in f:
            close = abs(f["dense_rows"] - f["knn_rows"]) < abs(f["sparse_rows"] - f["knn_rows"])
            lines += [f"With dense residual rows (each neighbour's whole distribution, recomputed from its final hidden "
                      f"state; {f['dense_tokens']:,} val tokens) ResMem scores {f['dense_rows']:.2f} against kNN-LM's "
                      f"{f['knn_rows']:.2f} and the top-{f['top_m']} rows' {f['sparse_rows']:.2f}: the neighbours' "
                      f"weighted distributions lie a total-variation distance of only {f['apart_dense']:.3f} from the "
                      "query's own p, so what ResMem takes away is nearly what kNN-LM takes away. "
                      + (f"The top-{f['top_m']} rows, which leave out {100 * f['missing_mass']:.0f}% of a neighbour's "
                         "probability mass, take away less, and that is what separates the two rows here, not the "
                         "residual itself." if close else
                         f"The top-{f['top_m']} rows leave out {100 * f['missing_mass']:.0f}% of a neighbour's mass; "
                         "dense rows do not bring ResMem closer to kNN-LM."), ""]
    if "last_block_input" in record:
        lines += layer_lines(seeds[0], record["last_block_input"])
    m, t = first, first["tuning"]
    gate = m.get("retrieval_gate")
    if gate:
        fit = t["retrieval_gate"]
        gain = m["base_perplexity"] - m["resmem_perplexity"]
        kept = lambda row: (m["base_perplexity"] - row["perplexity"]) / gain  # noqa: E731
        half = min(gate, key=lambda row: abs(row["searched"] - 0.5))
        lines += [f"**Learned retrieval gate** (seed {seeds[0]['seed']}; logistic regression on "
                  f"{', '.join(fit['features'])}, fitted on {fit['fit_examples']} val tokens at the chosen setting; "
                  f"the memory raised the true token's probability for {fit['fit_helped']} of them): ResMem's "
                  "perplexity when only the tokens the gate opens read the memory.", "",
                  "| cut-off | val tokens searched (%) | val perplexity | test tokens searched (%) | test perplexity "
                  "| share of ResMem's test gain kept (%) |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {row['cutoff']:.3f} | {100 * row['val_searched']:.1f} | {row['val_perplexity']:.2f} | "
                  f"{100 * row['searched']:.1f} | {row['perplexity']:.2f} | {100 * kept(row):.0f} |" for row in gate]
        lines += ["", f"Searching {100 * half['searched']:.0f}% of the test tokens keeps {100 * kept(half):.0f}% "
                  "of the perplexity gain over the base model.", ""]
    return lines


def layer_lines(seed: dict, other: dict) -> list[str]:
    """The memory's two layers on one seed's base model, each tuned on val over the same space."""
    layers = (("final", "the final hidden state", seed["metrics"]),
              ("last_block_input", "the last block's input", other))
    lines = [f"**The memory's layer** (seed {seed['seed']}, `text.lm_embedding`): the final hidden state against the "
             "last block's input, each tuned on val over the same space. The second row's base model is trained "
             "again from the same seed.", "",
             "| memory's layer | base test perplexity | method | settings (chosen on val) | val perplexity | "
             "test perplexity |", "| --- | ---: | --- | --- | ---: | ---: |"]
    val = {layer: {"resmem": m["tuning"]["best_val_perplexity"],
                   "knn_interp": m["tuning"]["knn_interp"]["val_perplexity"]} for layer, _, m in layers}
    for layer, _, m in layers:
        lines += [f"| {layer} | {m['base_perplexity']:.2f} | {name} | {lm_settings(key, m)} | {val[layer][key]:.2f} | "
                  f"{m[f'{key}_perplexity']:.2f} |" for key, name in LM_METHODS if key != "base"]
    said = []
    for key, name in LM_METHODS[1:]:
        (a, layer_a), (b, _) = sorted((val[layer][key], words) for layer, words, _ in layers)
        said.append(f"{name} is best on {layer_a} ({a:.2f} against {b:.2f})")
    return lines + ["", f"On val, {'; '.join(said)}.", ""]


def render() -> None:
    records = {n: json.loads((RECORDS / f"{n}.json").read_text()) for n in EXPERIMENTS
               if (RECORDS / f"{n}.json").is_file()}
    lines = ["# Results", "",
             "What memorizing residuals does on real data, measured with the suite's own commands. "
             "Every table below is written by `python benchmarks/results_doc.py` from the runs' own reports "
             "(`docs/results/<name>.json` keeps each run's figures and wall times). "
             "Every ResMem setting is chosen on a validation split; the test split chose nothing. "
             "Wall times are upper bounds: the 2-core machine that measured them ran other jobs beside them.", ""]
    for name, record in records.items():
        lines += [f"## {record['title']}", "", *commands_lines(record)]
        if name == "fashion_mnist_sweep":
            lines += sweep_lines(record)
        elif name == "bbc_lm":
            lines += lm_lines(record)
        else:
            lines += classification_lines(record)
            if name == "fashion_mnist_lt":
                lines += long_tail_lines(record)
    missing = [n for n in EXPERIMENTS if n not in records]
    if missing:
        lines += [f"Not yet recorded: {', '.join(missing)}.", ""]
    tmp = DOCS / ".results.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(DOCS / "results.md")
    print(f"[results] wrote {DOCS / 'results.md'} ({len(records)} experiments)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), help="run only these experiments")
    parser.add_argument("--render", action="store_true", help="only write docs/results.md from the records")
    args = parser.parse_args()
    if not args.render:
        for name in args.only or EXPERIMENTS:
            run_experiment(name)
    render()


if __name__ == "__main__":
    main()
