"""`resmem sweep`: the whole pipeline per base-model setting, under Ray Tune + ASHA.

ResMem's gains are largest for small models (Yang et al.); a width sweep shows it. Each
trial is one base model (sweep.width x sweep.lr) with its own run directory under
RUN/sweep/. At every rung (sweep.rungs, in epochs) the trial trains up to that epoch
(resuming from its Ray Train checkpoint), embeds, indexes and reports the val accuracy
of the base model and of ResMem; ASHA stops the weak trials on the ResMem val accuracy.
ResMem's setting is, per trial and rung, the best of the tune.* grid on val (one lookup,
then reweighting, as in `resmem tune`) with sweep.tune_resmem, else cfg.resmem's. A
trial that reaches the last rung is evaluated once on test with its chosen setting.
Writes RUN/sweep/results.json, report.md and width_sweep.png.
"""

from __future__ import annotations

import dataclasses
import json

from resmem_ray.schema import Config
from resmem_ray.stages.embed import embed
from resmem_ray.stages.evaluate import evaluate
from resmem_ray.stages.index import build_index
from resmem_ray.stages.train import train
from resmem_ray.stages.tune import TUNED, best_on_grid, ensure_index, neighbour_table, reweighted_accuracy
from resmem_ray.store.files import atomic_dir, write_json
from resmem_ray.store.rundir import RunDir


def trial_config(cfg: Config, width: int, lr: float, root: str) -> Config:
    return dataclasses.replace(
        cfg, run_dir=f"{root}/width{width}_lr{lr:g}",
        model=dataclasses.replace(cfg.model, width=width),
        train=dataclasses.replace(cfg.train, lr=lr, epochs=cfg.sweep.rungs[-1]),
        neighbour_transformer=dataclasses.replace(cfg.neighbour_transformer, enabled=False),
        tune=cfg.tune if cfg.sweep.tune_resmem else dataclasses.replace(cfg.tune, k=[cfg.resmem.k]))


def sweep_trial(config: dict, cfg: Config, root: str) -> None:
    from ray import tune

    r = cfg.resmem
    trial_cfg = trial_config(cfg, config["width"], config["lr"], root)
    run = RunDir(trial_cfg.run_dir)
    for rung in cfg.sweep.rungs:
        train(trial_cfg, until_epoch=rung)
        embed(trial_cfg)
        build_index(trial_cfg)  # new embeddings: a new memory
        table = neighbour_table(trial_cfg, run)
        if cfg.sweep.tune_resmem:
            setting, val_resmem = best_on_grid(table, cfg.tune)
        else:
            setting = {p: getattr(r, p) for p in TUNED}
            val_resmem = reweighted_accuracy(table, **setting)
        metrics = {"epoch": rung, "val_base": float((table["logits"].argmax(1) == table["labels"]).mean()),
                   "val_resmem": val_resmem, **setting}
        if rung == cfg.sweep.rungs[-1]:  # survived every rung: the one look at test
            final = dataclasses.replace(trial_cfg, resmem=dataclasses.replace(trial_cfg.resmem, **setting))
            ensure_index(final, run)
            acc = evaluate(final)["accuracy"]
            metrics.update(test_base=acc["base"], test_resmem=acc["resmem"])
        tune.report(metrics)


def sweep(cfg: Config) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    run = RunDir(cfg.run_dir)
    root = run.root / "sweep"
    s = cfg.sweep
    space = {"width": tune.grid_search(s.width), "lr": tune.grid_search(s.lr or [cfg.train.lr])}
    print(f"[sweep] {len(s.width) * len(s.lr or [1])} base models, rungs at epochs {s.rungs}, "
          f"ASHA reduction factor {s.reduction_factor}", flush=True)
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
        rows.append({"width": result.config["width"], "lr": result.config["lr"], "epochs": m["epoch"],
                     "val_base": m["val_base"], "val_resmem": m["val_resmem"],
                     "test_base": m.get("test_base"), "test_resmem": m.get("test_resmem"),
                     "k": m["k"], "sigma": m["sigma"], "temperature": m["temperature"]})
    rows.sort(key=lambda row: (row["width"], row["lr"]))
    with atomic_dir(root / "summary") as tmp:
        write_json(tmp / "results.json", rows)
        (tmp / "report.md").write_text(report(rows, cfg))
        plot_width_sweep(tmp / "width_sweep.png", rows, cfg)
    print((root / "summary" / "report.md").read_text(), flush=True)
    return {"trials": rows}


def _pct(x) -> str:
    return "stopped" if x is None else f"{100 * x:.2f}"


def report(rows: list[dict], cfg: Config) -> str:
    r = cfg.resmem
    chosen = (f"the best of the tune.* grid on val per trial ({len(cfg.tune.k)} k x {len(cfg.tune.sigma)} sigma x "
              f"{len(cfg.tune.temperature)} T x {len(cfg.tune.gate)} gate)" if cfg.sweep.tune_resmem
              else f"k={r.k}, sigma={r.sigma}, T={r.temperature}")
    lines = [f"# Base-model sweep: {cfg.data.name}, {cfg.model.name}", "",
             f"ResMem setting: {chosen}; ASHA on the val accuracy of ResMem, rungs at epochs "
             f"{cfg.sweep.rungs}. Test accuracy only for trials that reached the last rung.", "",
             "| width | lr | epochs | ResMem k, sigma, T | val base (%) | val ResMem (%) | test base (%) | "
             "test ResMem (%) | test gain (points) |",
             "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        gain = "" if row["test_base"] is None else f"{100 * (row['test_resmem'] - row['test_base']):+.2f}"
        lines.append(f"| {row['width']} | {row['lr']:g} | {row['epochs']} | "
                     f"{row['k']}, {row['sigma']:g}, {row['temperature']:g} | {_pct(row['val_base'])} | "
                     f"{_pct(row['val_resmem'])} | {_pct(row['test_base'])} | {_pct(row['test_resmem'])} | {gain} |")
    return "\n".join(lines) + "\n"


def plot_width_sweep(path, rows: list[dict], cfg: Config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, lr in enumerate(sorted({row["lr"] for row in rows})):
        mine = [row for row in rows if row["lr"] == lr]
        suffix = f" (lr {lr:g})" if len({row["lr"] for row in rows}) > 1 else ""
        for split, style in (("test", "-"), ("val", ":")):
            done = [row for row in mine if row[f"{split}_base"] is not None]
            widths = [row["width"] for row in done]
            ax.plot(widths, [100 * row[f"{split}_base"] for row in done], "o" + style, color=f"C{2 * i}",
                    label=f"base, {split}{suffix}")
            ax.plot(widths, [100 * row[f"{split}_resmem"] for row in done], "s" + style, color=f"C{2 * i + 1}",
                    label=f"ResMem, {split}{suffix}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("model width")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{cfg.data.name}: base vs ResMem per width")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_results(run: RunDir) -> list[dict]:
    return json.loads((run.root / "sweep" / "summary" / "results.json").read_text())

