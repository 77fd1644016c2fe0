"""Stage tune: Ray Tune over k, sigma, T and the gate, scored on the validation split.

Which neighbours a query has does not depend on sigma, T or the gate. So the val
queries are searched once, at the largest k of the space; the neighbour table (their
distances, labels and logits) goes into the object store once, and every trial only
reweights it: hundreds of trials cost about one lookup pass. Residuals are recomputed
per trial from the neighbours' logits, so T is searched too. The test split is not
read here; with tune.evaluate the best setting is indexed and evaluated once on test.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from resmem_ray.config import Config
from resmem_ray.embed import read_split
from resmem_ray.errors import ResMemError
from resmem_ray.index import prepare_queries, read_index_manifest
from resmem_ray.lookup import ShardedMemory
from resmem_ray.resmem import confidence_gate, residuals, resmem_probs, softmax
from resmem_ray.rundir import RunDir, write_json

TUNED = ("k", "sigma", "temperature", "gate", "gate_threshold")


def neighbour_table(cfg: Config, run: RunDir) -> dict[str, np.ndarray]:
    """The val split's k_max nearest memory rows, with what every trial needs."""
    manifest = read_index_manifest(run, needed_by="tune")
    if manifest.get("memorized"):
        raise ResMemError("the memory holds memorized examples without stored logits, so T cannot "
                          "be searched: run `resmem index` (train split only) before `resmem tune`")
    if manifest.get("codec") == "sparse":
        raise ResMemError("resmem tune reweights dense residual rows; this is a token memory with sparse "
                          "residuals (model.name=gpt2_lm): set resmem.k / sigma / gate and run `resmem evaluate`")
    val = read_split(run, "val", "tune", ("id", "label", "embedding", "logits"))
    train = read_split(run, "train", "tune", ("id", "logits"))
    k_max = max(cfg.tune.k)
    if k_max > manifest["rows"]:
        raise ResMemError(f"config key tune.k: {k_max} is larger than the memory ({manifest['rows']} rows)")
    queries = prepare_queries(val["embedding"], manifest["distance"], manifest["normalize"])
    print(f"[tune] searching {len(queries)} val queries once at k={k_max}", flush=True)
    with ShardedMemory(run.index, manifest, cfg.index) as memory:
        nb = memory.search_batches(queries, k_max, cfg.evaluate.batch_size)
    return {"distances": nb.distances, "neighbour_labels": nb.labels,
            "neighbour_logits": train["logits"][np.searchsorted(train["id"], nb.ids)],
            "logits": val["logits"], "labels": val["label"]}


def reweighted_accuracy(table: dict, k: int, sigma: float, temperature: float, gate: float,
                        gate_threshold: float = 1.0) -> float:
    """Val accuracy of ResMem with these settings, from the neighbour table alone."""
    n, _, c = table["neighbour_logits"].shape
    res = residuals(table["neighbour_logits"][:, :k].reshape(-1, c),
                    table["neighbour_labels"][:, :k].ravel(), temperature).reshape(n, k, c)
    base = softmax(table["logits"], temperature)
    gates = confidence_gate(base, gate, gate_threshold)
    probs = resmem_probs(base, res, table["distances"][:, :k], sigma, gates)
    return float((probs.argmax(1) == table["labels"]).mean())


def trial(config: dict, table: dict) -> None:
    """One Ray Tune trial: reweight, score, report once (no scheduler can help here)."""
    from ray import tune

    tune.report({"val_accuracy": reweighted_accuracy(table, **{p: config[p] for p in TUNED})})


def search_space(cfg: Config) -> tuple[dict, int]:
    from ray import tune

    t = cfg.tune
    if t.search == "grid":
        return {p: tune.grid_search(getattr(t, p)) for p in TUNED}, 1
    space = {"k": tune.choice(t.k)}
    for p, dist in (("sigma", tune.loguniform), ("temperature", tune.loguniform), ("gate", tune.uniform),
                    ("gate_threshold", tune.uniform)):
        lo, hi = min(getattr(t, p)), max(getattr(t, p))
        space[p] = lo if lo == hi else dist(lo, hi)
    return space, t.num_samples


def tune_resmem(cfg: Config) -> dict:
    from ray import tune

    from resmem_ray.evaluate import evaluate
    from resmem_ray.index import build_index

    run = RunDir(cfg.run_dir)
    table = neighbour_table(cfg, run)
    run.mark_running("tune", cfg.to_dict())
    base = float((table["logits"].argmax(1) == table["labels"]).mean())
    space, samples = search_space(cfg)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, table=table), {"cpu": cfg.tune.cpus_per_trial}),
        param_space=space,
        # trials are cheap reweightings: reusing trial actors saves a process start per trial
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", num_samples=samples, reuse_actors=True),
        run_config=tune.RunConfig(name="search", storage_path=str(run.root / "tune"), verbose=0))
    results = tuner.fit()
    frame = results.get_dataframe().sort_values("val_accuracy", ascending=False)
    frame = frame.rename(columns={f"config/{p}": p for p in TUNED})[[*TUNED, "val_accuracy"]]
    frame = frame.astype({"k": int, **{p: float for p in TUNED[1:]}})
    best = {p: frame[p].iloc[0].item() for p in TUNED}  # per column: a row would upcast k
    summary = {"best": best, "best_val_accuracy": frame["val_accuracy"].iloc[0].item(),
               "base_val_accuracy": base, "trials": len(frame), "search": cfg.tune.search,
               "top": frame.head(10).to_dict("records")}
    write_json(run.root / "tune" / "best.json", summary)
    print(f"[tune] {len(frame)} trials; best on val: {best} -> {summary['best_val_accuracy']:.4f} "
          f"(base {base:.4f})", flush=True)
    if cfg.tune.evaluate:  # the one look at test, with the chosen setting
        final = dataclasses.replace(cfg, resmem=dataclasses.replace(cfg.resmem, **best))
        if final.resmem.temperature != cfg.resmem.temperature:
            build_index(final)
        evaluate(final, tuning=summary)
    # last: rebuilding the index at the best T invalidates the stages after it, tune included
    run.mark_done("tune", cfg.to_dict(), best=best, best_val_accuracy=summary["best_val_accuracy"],
                  trials=len(frame))
    return summary
