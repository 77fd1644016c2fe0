"""`resmem tune` for a token memory (the sparse codec of model.name=gpt2_lm): Ray Tune over
k, sigma and the gate, with val perplexity as the objective (next-token accuracy beside
it), then the kNN-LM baseline's lambda and tau on the same neighbours, then `evaluate`
once on test.

The val tokens are searched once at the largest k; every trial reweights those
neighbours' sparse rows. T stays the index's: the memory's top-m probabilities were
encoded at it (changing T means `resmem embed` again). The config's own setting is
scored too; if no trial beats it on val, it is kept and the log says so.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from resmem_ray.core.knn import prepare_queries
from resmem_ray.errors import ResMemError
from resmem_ray.log import stage_log
from resmem_ray.runtime.shards import ShardedMemory
from resmem_ray.schema import Config
from resmem_ray.stages.evaluate import evaluate
from resmem_ray.store.artifacts import read_split
from resmem_ray.store.files import write_json
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.registry import task_for

log = stage_log("tune")

SEARCHED = ("k", "sigma", "gate")


def val_scores(cfg: Config, setting: dict, table: dict) -> dict:
    """{method: {accuracy, perplexity}} on the val tokens at this resmem setting."""
    chosen = dataclasses.replace(cfg, resmem=dataclasses.replace(cfg.resmem, **setting))
    return task_for(cfg).token_scores(chosen, table["logits"], table["labels"], table["neighbours"])


def trial(config: dict, cfg: Config, table: dict) -> None:
    from ray import tune

    scores = val_scores(cfg, config, table)["resmem"]
    tune.report({"val_perplexity": scores["perplexity"], "val_accuracy": scores["accuracy"]})


def token_table(cfg: Config, run: RunDir, manifest: dict) -> dict:
    """The val tokens' max(tune.k) nearest memory rows, searched once."""
    val = read_split(run, "val", "tune", ("id", "label", "embedding", "logits"))
    k_max = max(cfg.tune.k)
    if k_max > manifest["rows"]:
        raise ResMemError(f"config key tune.k: {k_max} is larger than the memory ({manifest['rows']} rows)")
    queries = prepare_queries(val["embedding"], manifest["distance"], manifest["normalize"])
    log.info(f"searching {len(queries)} val tokens once at k={k_max}; T stays {manifest['temperature']} "
             "(the token memory's top-m were encoded at it)")
    with ShardedMemory(run.index, manifest, cfg.index) as memory:
        nb = memory.search_batches(queries, k_max, cfg.evaluate.batch_size)
    return {"logits": val["logits"], "labels": val["label"], "neighbours": nb}


def tune_token_memory(cfg: Config, run: RunDir, manifest: dict) -> dict:
    from ray import tune

    table = token_table(cfg, run, manifest)
    run.mark_running("tune", cfg.to_dict())
    untuned = {p: getattr(cfg.resmem, p) for p in SEARCHED}
    first = val_scores(cfg, untuned, table)
    t = cfg.tune
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, cfg=cfg, table=table), {"cpu": t.cpus_per_trial}),
        param_space={p: tune.grid_search(getattr(t, p)) for p in SEARCHED},
        tune_config=tune.TuneConfig(metric="val_perplexity", mode="min", reuse_actors=True),
        run_config=tune.RunConfig(name="search", storage_path=str(run.root / "tune"), verbose=0))
    frame = tuner.fit().get_dataframe().rename(columns={f"config/{p}": p for p in SEARCHED})
    frame = frame.sort_values("val_perplexity", kind="stable")[[*SEARCHED, "val_perplexity", "val_accuracy"]]
    top = {column: frame[column].iloc[0].item() for column in frame}  # per column: a row would upcast k
    if top["val_perplexity"] < first["resmem"]["perplexity"]:
        best, best_ppl = {p: top[p] for p in SEARCHED}, top["val_perplexity"]
    else:
        log.info(f"no setting of the grid beats the config's {untuned} on val perplexity "
                 f"({first['resmem']['perplexity']:.2f}): it is kept")
        best, best_ppl = untuned, first["resmem"]["perplexity"]
    knn = tune_knn_lm(cfg, table, best["k"])
    best.update(knn_lambda=knn["knn_lambda"], knn_tau=knn["knn_tau"])
    summary = {"best": best, "best_val_perplexity": best_ppl, "base_val_perplexity": first["base"]["perplexity"],
               "untuned": {**untuned, "val_perplexity": first["resmem"]["perplexity"],
                           "val_accuracy": first["resmem"]["accuracy"]},
               "best_val_accuracy": val_scores(cfg, best, table)["resmem"]["accuracy"],
               "knn_lm": knn, "trials": len(frame), "search": "grid", "objective": "val perplexity",
               "top": frame.head(10).astype({"k": int}).to_dict("records")}
    write_json(run.root / "tune" / "best.json", summary)
    log.info(f"{len(frame)} trials; val perplexity: base {summary['base_val_perplexity']:.2f}, config's setting "
             f"{first['resmem']['perplexity']:.2f}, best {best_ppl:.2f} at {best}; kNN-LM lambda={knn['knn_lambda']}, "
             f"tau={knn['knn_tau']} -> {knn['val_perplexity']:.2f}")
    if t.evaluate:
        evaluate(dataclasses.replace(cfg, resmem=dataclasses.replace(cfg.resmem, **best)), tuning=summary)
    run.mark_done("tune", cfg.to_dict(), best=best, best_val_perplexity=best_ppl, trials=len(frame))
    return summary


def tune_knn_lm(cfg: Config, table: dict, k: int) -> dict:
    """The kNN-LM baseline's (lambda, tau) of tune.knn_lambda x tune.knn_tau at ResMem's
    chosen k, by val perplexity, from the same neighbours."""
    best, best_ppl, best_acc = None, math.inf, 0.0
    for lam, tau in itertools.product(cfg.tune.knn_lambda, cfg.tune.knn_tau):
        knn = val_scores(cfg, {"k": k, "knn_lambda": lam, "knn_tau": tau}, table)["knnlm"]
        if knn["perplexity"] < best_ppl:
            best, best_ppl, best_acc = {"knn_lambda": lam, "knn_tau": tau}, knn["perplexity"], knn["accuracy"]
    if best is None:
        raise ResMemError("every kNN-LM setting of tune.knn_lambda x tune.knn_tau gives infinite val perplexity "
                          "(lambda=1 drops the model): add a lambda below 1")
    return {**best, "k": k, "val_perplexity": best_ppl, "val_accuracy": best_acc,
            "trials": len(cfg.tune.knn_lambda) * len(cfg.tune.knn_tau)}
