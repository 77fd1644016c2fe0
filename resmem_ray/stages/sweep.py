"""`resmem sweep`: the whole pipeline per base-model setting, under Ray Tune + ASHA.

ResMem's gains are largest for small models (Yang et al.); a width sweep shows it. Each
trial is one base model (sweep.width x sweep.lr x sweep.seeds) with its own run
directory under RUN/sweep/. At every rung (sweep.rungs, in epochs) the trial trains up
to that epoch (resuming from its Ray Train checkpoint), embeds, indexes and reports the
val accuracy of the base model and of ResMem; ASHA stops the weak trials on the ResMem
val accuracy. ResMem's setting is, per trial and rung, the best of the tune.* grid on
val (one lookup, then reweighting, as in `resmem tune`) with sweep.tune_resmem, else
cfg.resmem's. A trial that reaches the last rung is scored like `resmem tune` scores a
run: every method on val from the same neighbour table, then once on test (with the
neighbour Transformer when enabled). The summary gives each method's mean and standard
deviation over seeds per width, on val and on test.
Writes RUN/sweep/summary/{results.json, report.md, width_sweep.png}.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from pathlib import Path

import numpy as np

from resmem_ray.errors import ConfigError
from resmem_ray.log import logger, stage_log
from resmem_ray.schema import Config
from resmem_ray.stages.embed import embed
from resmem_ray.stages.index import build_index
from resmem_ray.stages.train import train
from resmem_ray.stages.tune import best_on_grid, evaluate_chosen, neighbour_table, searched, tuning_summary, with_setting
from resmem_ray.tasks.methods import ordered, plotted, title
from resmem_ray.tasks.registry import task_for
from resmem_ray.store.files import atomic_dir, write_json
from resmem_ray.store.rundir import RunDir

log = stage_log("sweep")


def trial_config(cfg: Config, width: int, lr: float, seed: int, root: str) -> Config:
    return dataclasses.replace(
        cfg, run_dir=f"{root}/width{width}_lr{lr:g}_seed{seed}", seed=seed,
        model=dataclasses.replace(cfg.model, width=width),
        train=dataclasses.replace(cfg.train, lr=lr, epochs=cfg.sweep.rungs[-1]),
        tune=cfg.tune if cfg.sweep.tune_resmem else dataclasses.replace(
            cfg.tune, **{p: [getattr(cfg.resmem, p)] for p in searched(task_for(cfg))}))


def sweep_trial(config: dict, cfg: Config, root: str) -> None:
    from ray import tune

    trial_cfg = trial_config(cfg, config["width"], config["lr"], config["seed"], root)
    task = task_for(trial_cfg)
    run = RunDir(trial_cfg.run_dir)
    for rung in cfg.sweep.rungs:
        train(trial_cfg, until_epoch=rung)
        embed(trial_cfg)
        build_index(trial_cfg)  # new embeddings: a new memory
        # deep enough for every k of the grid and every k-NN row of the report
        with tempfile.TemporaryDirectory(prefix=".tune-tables-", dir=run.root) as scratch:
            table = neighbour_table(trial_cfg, run, Path(scratch), with_knn_ks=True)
            setting, val_resmem = best_on_grid(trial_cfg, table)
            val_base = task.val_scores(trial_cfg, table, ("base",))["base"]["val_accuracy"]
            metrics = {"epoch": rung, "val_base": val_base, "val_resmem": val_resmem, **setting}
            if rung == cfg.sweep.rungs[-1]:  # survived every rung: every method on val, the one look at test
                summary = tuning_summary(trial_cfg, table, {**setting, "distance": trial_cfg.resmem.distance,
                                                            "normalize": trial_cfg.resmem.normalize},
                                         {"val_accuracy": val_resmem}, grid_size(trial_cfg), "grid", [])
                metrics["val"] = task.method_accuracies(with_setting(trial_cfg, summary["best"]), table, summary)
                metrics["test"] = evaluate_chosen(dataclasses.replace(trial_cfg, tune=dataclasses.replace(
                    trial_cfg.tune, evaluate=True)), run, summary)["accuracy"]
            tune.report(metrics)


def grid_size(cfg: Config) -> int:
    return len(list(itertools.product(*(getattr(cfg.tune, p) for p in searched(task_for(cfg))))))


def check_sweepable(cfg: Config) -> None:
    """A sweep trains a base model per trial: a model trained elsewhere has none to train."""
    if cfg.model.source != "trained":
        raise ConfigError(f"config key model.source={cfg.model.source}: `resmem sweep` trains the base model per "
                          "width and rung, and a given model is not trained: run `resmem run` (or `resmem tune`) "
                          "on it instead")


def sweep(cfg: Config) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    check_sweepable(cfg)
    run = RunDir(cfg.run_dir)
    root = run.root / "sweep"
    s = cfg.sweep
    seeds = s.seeds or [cfg.seed]
    space = {"width": tune.grid_search(s.width), "lr": tune.grid_search(s.lr or [cfg.train.lr]),
             "seed": tune.grid_search(seeds)}
    log.info(f"{len(s.width) * len(s.lr or [1]) * len(seeds)} base models ({len(s.width)} widths x "
             f"{len(s.lr or [1])} lr x {len(seeds)} seeds), rungs at epochs {s.rungs}, "
             f"ASHA reduction factor {s.reduction_factor}")
    tuner = tune.Tuner(
        # the trial process only drives the stages; Ray Train, Ray Data and the shard actors
        # inside it ask for their own CPUs
        tune.with_resources(tune.with_parameters(sweep_trial, cfg=cfg, root=str(root)),
                            {"cpu": s.cpus_per_trial}),
        param_space=space,
        tune_config=tune.TuneConfig(
            max_concurrent_trials=s.max_concurrent,
            scheduler=ASHAScheduler(time_attr="epoch", metric="val_resmem", mode="max", max_t=s.rungs[-1],
                                    grace_period=s.rungs[0], reduction_factor=s.reduction_factor)),
        run_config=tune.RunConfig(name="search", storage_path=str(root / "tune"), verbose=1))  # trial table
    results = tuner.fit()
    rows = []
    for result in results:
        if result.error:
            raise result.error
        m = result.metrics
        rows.append({"width": result.config["width"], "lr": result.config["lr"], "seed": result.config["seed"],
                     "epochs": m["epoch"], "val_base": m["val_base"], "val_resmem": m["val_resmem"],
                     "val": m.get("val"), "test": m.get("test"),
                     "k": m["k"], "sigma": m["sigma"], "temperature": m["temperature"], "gate": m["gate"]})
    rows.sort(key=lambda row: (row["width"], row["lr"], row["seed"]))
    groups = aggregate(rows)
    with atomic_dir(root / "summary") as tmp:
        write_json(tmp / "results.json", {"trials": rows, "groups": groups})
        (tmp / "report.md").write_text(report(rows, groups, cfg))
        plot_width_sweep(tmp / "width_sweep.png", groups, cfg)
    logger.info((root / "summary" / "report.md").read_text())
    return {"trials": rows, "groups": groups}


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (width, lr): every method's mean and standard deviation over the seeds that
    reached the last rung, on val and on test, and ResMem's gain over the base model."""
    groups = []
    for width, lr in sorted({(row["width"], row["lr"]) for row in rows}):
        done = [row for row in rows if (row["width"], row["lr"]) == (width, lr) and row["test"]]
        group = {"width": width, "lr": lr, "seeds": [row["seed"] for row in done],
                 "stopped": sum((row["width"], row["lr"]) == (width, lr) and not row["test"] for row in rows)}
        for split in ("val", "test"):
            methods = [m for m in (done[0][split] if done else {}) if all(m in row[split] for row in done)]
            values = {m: np.array([row[split][m] for row in done]) for m in methods}
            group[split] = {m: spread(v) for m, v in values.items()}
            if "resmem" in values:
                group[f"{split}_gain"] = spread(values["resmem"] - values["base"])
        groups.append(group)
    return groups


def spread(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "n": int(len(values))}


def _pct(x) -> str:
    return "stopped" if x is None else f"{100 * x:.2f}"


def _mean_std(s: dict | None) -> str:
    if s is None:
        return ""
    return f"{100 * s['mean']:.2f}" + (f" ± {100 * s['std']:.2f}" if s["n"] > 1 else "")


def report(rows: list[dict], groups: list[dict], cfg: Config) -> str:
    r = cfg.resmem
    chosen = (f"the best of the tune.* grid on val per trial ({grid_size(cfg)} settings)"
              if cfg.sweep.tune_resmem else f"k={r.k}, sigma={r.sigma}, T={r.temperature}, gate={r.gate}")
    seeds = cfg.sweep.seeds or [cfg.seed]
    lines = [f"# Base-model sweep: {cfg.data.name}, {cfg.model.name}", "",
             f"ResMem setting: {chosen}; ASHA on the val accuracy of ResMem, rungs at epochs "
             f"{cfg.sweep.rungs}; seeds {seeds} (a seed draws the val split and the model's initialisation). "
             "Every method is scored only for trials that reached the last rung.", ""]
    for split in ("test", "val"):
        methods = ordered({m for g in groups for m in g[split]})
        if not methods:
            continue
        head = " | ".join(f"width {g['width']}" + (f", lr {g['lr']:g}" if len(cfg.sweep.lr) > 1 else "")
                          for g in groups)
        lines += [f"## {split.capitalize()} accuracy (%), mean ± standard deviation over seeds", "",
                  f"| method | {head} |", "| --- |" + " ---: |" * len(groups)]
        lines += [f"| {title(m)} | " + " | ".join(_mean_std(g[split].get(m)) for g in groups) + " |"
                  for m in methods]
        lines.append("| ResMem - base (points) | " + " | ".join(
            "" if f"{split}_gain" not in g else f"{100 * g[f'{split}_gain']['mean']:+.2f}"
            + (f" ± {100 * g[f'{split}_gain']['std']:.2f}" if g[f"{split}_gain"]["n"] > 1 else "")
            for g in groups) + " |")
        lines.append("| seeds | " + " | ".join(f"{len(g['seeds'])}" + (f" ({g['stopped']} stopped)" if g["stopped"]
                                                                          else "") for g in groups) + " |")
        lines.append("")
    lines += ["On val, ResMem, kNN interpolation and the learned gate are scored on the split that chose "
              "their settings (optimistic); test chose nothing. The neighbour Transformer is scored on test "
              "only. Oracle gate: base or 1-NN, whichever is right (an upper bound, not a method).", "",
              "## Trials", "",
              "| width | lr | seed | epochs | ResMem k, sigma, T, gate | val base (%) | val ResMem (%) | "
              "test base (%) | test ResMem (%) | test gain (points) |",
              "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        test = row["test"] or {}
        gain = f"{100 * (test['resmem'] - test['base']):+.2f}" if test else ""
        lines.append(f"| {row['width']} | {row['lr']:g} | {row['seed']} | {row['epochs']} | "
                     f"{row['k']}, {row['sigma']:g}, {row['temperature']:g}, {row['gate']:g} | "
                     f"{_pct(row['val_base'])} | {_pct(row['val_resmem'])} | {_pct(test.get('base'))} | "
                     f"{_pct(test.get('resmem'))} | {gain} |")
    return "\n".join(lines) + "\n"


def plot_width_sweep(path, groups: list[dict], cfg: Config) -> None:
    """Test accuracy per width (left) and the gain over the base model (right), with error
    bars of one standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, gain_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    lrs = sorted({g["lr"] for g in groups})
    for i, lr in enumerate(lrs):
        mine = [g for g in groups if g["lr"] == lr and g["test"]]
        widths = [g["width"] for g in mine]
        suffix = f" (lr {lr:g})" if len(lrs) > 1 else ""
        for j, m in enumerate(plotted({m for g in mine for m in g["test"]})):
            if all(m in g["test"] for g in mine):
                acc_ax.errorbar(widths, [100 * g["test"][m]["mean"] for g in mine],
                                yerr=[100 * g["test"][m]["std"] for g in mine], marker="os^Dv<>p"[j % 8], capsize=3,
                                color=f"C{j}", ls="-" if i == 0 else "--", label=title(m) + suffix)
        for split, style in (("test", "-"), ("val", ":")):
            have = [g for g in mine if f"{split}_gain" in g]
            gain_ax.errorbar([g["width"] for g in have], [100 * g[f"{split}_gain"]["mean"] for g in have],
                             yerr=[100 * g[f"{split}_gain"]["std"] for g in have], marker="o", capsize=3,
                             ls=style, color=f"C{2 * i + (split == 'val')}", label=f"{split}{suffix}")
    gain_ax.axhline(0, color="gray", lw=0.8)
    for ax in (acc_ax, gain_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("model width")
        ax.legend(fontsize=7)
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_title(f"{cfg.data.name}: accuracy per width (mean ± std over seeds)")
    gain_ax.set_ylabel("ResMem - base (points)")
    gain_ax.set_title("gain of ResMem over the base model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
