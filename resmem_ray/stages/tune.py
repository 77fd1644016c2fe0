"""Stage tune: Ray Tune over k, sigma, T, the gate and the distance, scored on val (a
token memory's sparse rows: stages/tune_lm.py, by val perplexity).

Which neighbours a query has does not depend on sigma, T or the gate. So the val
queries are searched once per (distance, normalize) pair at the largest k of the space;
each neighbour table (distances, labels and logits of the neighbours) goes into the
object store once, and every trial only reweights it: hundreds of trials cost about one
lookup pass. Residuals are recomputed from the neighbours' logits, so T is searched too.

After the search: the kNN interpolation baseline gets its own (lambda, tau) on val at the
best k and T from the same neighbour table, a learned gate is fitted on val at the best
setting, the index is
rebuilt at the best T / distance if needed, the neighbour Transformer is trained when
enabled, and `evaluate` runs once on test. The test split is read only there.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid

import numpy as np

from resmem_ray.core.gates import fit_learned_gate, gate_features, learned_gate
from resmem_ray.core.knn import Neighbours, prepare_queries
from resmem_ray.core.resmem import (apply_correction, confidence_gate, knn_interpolation, memory_correction,
                                    residuals, softmax)
from resmem_ray.errors import ResMemError
from resmem_ray.log import stage_log
from resmem_ray.runtime.shards import ShardedMemory
from resmem_ray.schema import Config, TuneConfig
from resmem_ray.stages.evaluate import evaluate
from resmem_ray.stages.index import build_index
from resmem_ray.stages.transformer import train_neighbour_transformer
from resmem_ray.stages.tune_lm import tune_token_memory
from resmem_ray.store.artifacts import read_index_manifest, read_memory_split, read_split
from resmem_ray.store.files import write_json
from resmem_ray.store.rundir import RunDir

log = stage_log("tune")

TUNED = ("k", "sigma", "temperature", "gate", "gate_threshold", "gate_softness")
MEMORY = ("distance", "normalize")  # these change the neighbours: one index and one val search each


def memory_key(distance: str, normalize: bool) -> str:
    return f"{distance}/{'normalized' if normalize else 'raw'}"


def neighbour_table(cfg: Config, run: RunDir, k_max: int | None = None) -> dict:
    """The val split's k_max (default: the largest tune.k) nearest memory rows in the
    current index, with what every trial needs (neighbours' logits, not residuals, so that
    T can change)."""
    manifest = read_index_manifest(run, needed_by="tune")
    check_dense(manifest, cfg)
    val = read_split(run, "val", "tune", ("id", "label", "embedding", "logits"))
    train = read_memory_split(run, "tune", ("id", "logits"))  # memorized rows included
    k_max = k_max or max(cfg.tune.k)
    if k_max > manifest["rows"]:
        raise ResMemError(f"config key tune.k (or evaluate.knn_ks): {k_max} is larger than the memory ({manifest['rows']} rows)")
    queries = prepare_queries(val["embedding"], manifest["distance"], manifest["normalize"])
    log.info(f"searching {len(queries)} val queries once at k={k_max} "
             f"({memory_key(manifest['distance'], manifest['normalize'])})")
    with ShardedMemory(run.index, manifest, cfg.index) as memory:
        nb = memory.search_batches(queries, k_max, cfg.evaluate.batch_size)
    return {"token": uuid.uuid4().hex, "distances": nb.distances, "neighbour_labels": nb.labels,
            "neighbour_ids": nb.ids,
            "neighbour_logits": train["logits"][np.searchsorted(train["id"], nb.ids)],
            "logits": val["logits"], "labels": val["label"]}


def with_memory(cfg: Config, distance: str, normalize: bool) -> Config:
    return dataclasses.replace(cfg, resmem=dataclasses.replace(cfg.resmem, distance=distance, normalize=normalize))


def ensure_index(cfg: Config, run: RunDir, keys=("temperature", *MEMORY)) -> None:
    """Rebuild the index unless it already has cfg's values of these resmem keys."""
    manifest = read_index_manifest(run, needed_by="tune")
    if any(manifest[key] != getattr(cfg.resmem, key) for key in keys):
        build_index(dataclasses.replace(cfg, resmem=dataclasses.replace(
            cfg.resmem, **{key: manifest[key] for key in ("temperature", *MEMORY) if key not in keys})))


def neighbour_tables(cfg: Config, run: RunDir) -> dict[str, dict]:
    """One neighbour table per (distance, normalize) pair of the search space."""
    tables = {}
    for distance in cfg.tune.distance:
        for normalize in cfg.tune.normalize:
            pair_cfg = with_memory(cfg, distance, normalize)
            ensure_index(pair_cfg, run, keys=MEMORY)
            tables[memory_key(distance, normalize)] = neighbour_table(pair_cfg, run)
    return tables


_RESIDUALS: dict = {}  # per trial process: the last T's residual rows (the grid varies T slowest)


def neighbour_residuals(table: dict, temperature: float) -> np.ndarray:
    key = (table["token"], temperature)
    if key not in _RESIDUALS:
        _RESIDUALS.clear()
        n, k, c = table["neighbour_logits"].shape
        _RESIDUALS[key] = residuals(table["neighbour_logits"].reshape(-1, c),
                                    table["neighbour_labels"].ravel(), temperature).reshape(n, k, c)
    return _RESIDUALS[key]


def table_neighbours(table: dict, temperature: float) -> Neighbours:
    """The table's neighbours with their residual rows at T."""
    return Neighbours(table["distances"], table["neighbour_ids"], table["neighbour_labels"],
                      neighbour_residuals(table, temperature))


def corrected(table: dict, k: int, sigma: float, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(base probs, the memory's correction) of every val query."""
    res = neighbour_residuals(table, temperature)[:, :k]
    return softmax(table["logits"], temperature), memory_correction(res, table["distances"][:, :k], sigma)


def reweighted_accuracy(table: dict, k: int, sigma: float, temperature: float, gate: float,
                        gate_threshold: float = 1.0, gate_softness: float = 0.0) -> float:
    """Val accuracy of ResMem with these settings, from the neighbour table alone."""
    base, correction = corrected(table, k, sigma, temperature)
    gates = confidence_gate(base, gate, gate_threshold, gate_softness)
    return float((apply_correction(base, correction, gates).argmax(1) == table["labels"]).mean())


def best_on_grid(table: dict, t: TuneConfig) -> tuple[dict, float]:
    """The best setting of tune.*'s grid on one neighbour table, in process: for callers that
    are already a Ray Tune trial (`resmem sweep`). Ties keep the first setting met."""
    best, best_acc = None, -1.0
    for temperature in t.temperature:  # outermost: the residual cache holds one T
        for k, sigma, gate, threshold, softness in itertools.product(t.k, t.sigma, t.gate, t.gate_threshold,
                                                                     t.gate_softness):
            acc = reweighted_accuracy(table, k, sigma, temperature, gate, threshold, softness)
            if acc > best_acc:
                best_acc = acc
                best = {"k": k, "sigma": sigma, "temperature": temperature, "gate": gate,
                        "gate_threshold": threshold, "gate_softness": softness}
    return best, best_acc


def trial(config: dict, tables: dict) -> None:
    """One Ray Tune trial: reweight, score, report once (no scheduler can help here)."""
    from ray import tune

    table = tables[config["memory"]]
    tune.report({"val_accuracy": reweighted_accuracy(table, **{p: config[p] for p in TUNED})})


def search_space(cfg: Config, memories: list[str]) -> tuple[dict, int, object]:
    """(param_space, num_samples, search_alg) for tune.search = grid | random | optuna."""
    from ray import tune

    t = cfg.tune
    if t.search == "grid":  # temperature and memory last: they vary slowest, which the cache likes
        space = {p: tune.grid_search(getattr(t, p)) for p in TUNED if p != "temperature"}
        return {**space, "temperature": tune.grid_search(t.temperature),
                "memory": tune.grid_search(memories)}, 1, None
    space = {"k": tune.choice(t.k), "memory": tune.choice(memories) if len(memories) > 1 else memories[0]}
    for p, dist in (("sigma", tune.loguniform), ("temperature", tune.loguniform), ("gate", tune.uniform),
                    ("gate_threshold", tune.uniform), ("gate_softness", tune.uniform)):
        lo, hi = min(getattr(t, p)), max(getattr(t, p))
        space[p] = lo if lo == hi else dist(lo, hi)
    if t.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return space, t.num_samples, OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    return space, t.num_samples, None


def run_search(cfg: Config, run: RunDir, tables: dict) -> "pandas.DataFrame":  # noqa: F821
    from ray import tune

    space, samples, search_alg = search_space(cfg, list(tables))
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, tables=tables), {"cpu": cfg.tune.cpus_per_trial}),
        param_space=space,
        # trials are cheap reweightings: reusing trial actors saves a process start per trial
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", num_samples=samples,
                                    search_alg=search_alg, reuse_actors=True),
        run_config=tune.RunConfig(name="search", storage_path=str(run.root / "tune"), verbose=0))
    frame = tuner.fit().get_dataframe().sort_values("val_accuracy", ascending=False, kind="stable")
    frame = frame.rename(columns={f"config/{p}": p for p in (*TUNED, "memory")})
    if "memory" not in frame:
        frame["memory"] = list(tables)[0]
    pairs = {memory_key(d, n): (d, n) for d in cfg.tune.distance for n in cfg.tune.normalize}
    frame["distance"] = [pairs[m][0] for m in frame["memory"]]
    frame["normalize"] = [pairs[m][1] for m in frame["memory"]]
    frame = frame[[*TUNED, *MEMORY, "memory", "val_accuracy"]]
    return frame.astype({"k": int, **{p: float for p in TUNED[1:]}}).reset_index(drop=True)


def plot_search(folder, frame) -> None:
    """val_accuracy_vs_k.png (best over the rest per k) and sigma_T_heatmap.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_k = frame.groupby("k")["val_accuracy"].max()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(per_k.index, 100 * per_k.values, "o-")
    ax.set_xlabel("k")
    ax.set_ylabel("best val accuracy (%)")
    ax.set_title("ResMem on val: best setting per k")
    fig.tight_layout()
    _save(fig, folder / "val_accuracy_vs_k.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    if frame["sigma"].nunique() <= 12 and frame["temperature"].nunique() <= 12:  # a grid
        grid = frame.pivot_table(index="sigma", columns="temperature", values="val_accuracy", aggfunc="max")
        im = ax.imshow(100 * grid.values, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(grid.shape[1]), [f"{t:g}" for t in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{s:g}" for s in grid.index])
        mid = 100 * np.nanmean([np.nanmin(grid.values), np.nanmax(grid.values)])
        for (i, j), v in np.ndenumerate(100 * grid.values):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w" if v < mid else "k")
    else:  # sampled: one dot per trial
        im = ax.scatter(frame["temperature"], frame["sigma"], c=100 * frame["val_accuracy"], cmap="viridis")
        ax.set_xscale("log")
        ax.set_yscale("log")
    fig.colorbar(im, ax=ax, label="best val accuracy (%)")
    ax.set_xlabel("T (softmax temperature)")
    ax.set_ylabel("sigma (kernel temperature)")
    ax.set_title("ResMem on val: sigma x T (best over k, gate)")
    fig.tight_layout()
    _save(fig, folder / "sigma_T_heatmap.png")


def _save(fig, path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def fit_gate_on_val(table: dict, best: dict) -> dict:
    """The learned gate at the best k, sigma, T, with its (in-sample) val accuracy."""
    base, correction = corrected(table, best["k"], best["sigma"], best["temperature"])
    k = best["k"]
    features = gate_features(base, table["neighbour_labels"][:, :k], table["distances"][:, :k], correction)
    params = fit_learned_gate(features, base.argmax(1) != table["labels"])
    g = learned_gate(params, features)
    params["val_accuracy"] = float((apply_correction(base, correction, g).argmax(1) == table["labels"]).mean())
    return params


def tune_knn_interp(table: dict, best: dict, t: TuneConfig) -> dict:
    """The kNN interpolation baseline tuned on val like ResMem: the best (lambda, tau) of
    tune.knn_lambda x tune.knn_tau at ResMem's chosen k and T, from the same neighbour table.
    Ties keep the first setting met."""
    k = best["k"]
    base = softmax(table["logits"], best["temperature"])
    labels, distances = table["neighbour_labels"][:, :k], table["distances"][:, :k]
    chosen, best_acc = None, -1.0
    for tau, lam in itertools.product(t.knn_tau, t.knn_lambda):
        acc = float((knn_interpolation(base, labels, distances, lam, tau).argmax(1) == table["labels"]).mean())
        if acc > best_acc:
            chosen, best_acc = {"knn_lambda": lam, "knn_tau": tau}, acc
    return {**chosen, "k": k, "temperature": best["temperature"], "val_accuracy": best_acc,
            "trials": len(t.knn_tau) * len(t.knn_lambda)}


def check_dense(manifest: dict, cfg: Config) -> None:
    if manifest.get("codec", "dense") != "dense":
        raise ResMemError(f"resmem tune reweights dense or sparse residual rows; this memory holds "
                          f"{manifest['codec']} residuals (model.name={cfg.model.name}): set resmem.k / sigma / "
                          "gate and run `resmem evaluate`")


def tuning_summary(cfg: Config, table: dict, best: dict, best_val_accuracy: float, trials: int, search: str,
                   top: list[dict]) -> dict:
    """What evaluate reports of a search: the chosen setting and, from the same neighbour
    table, the kNN interpolation baseline's (lambda, tau) and the learned gate."""
    summary = {"best": best, "best_val_accuracy": best_val_accuracy,
               "base_val_accuracy": float((table["logits"].argmax(1) == table["labels"]).mean()),
               "trials": trials, "search": search, "top": top,
               "knn_interp": tune_knn_interp(table, best, cfg.tune)}
    if cfg.tune.learned_gate:
        summary["learned_gate"] = fit_gate_on_val(table, best)
    return summary


def evaluate_chosen(cfg: Config, run: RunDir, summary: dict) -> dict | None:
    """Rebuild the index for the chosen setting if needed, train the neighbour Transformer
    when enabled, and evaluate once on test (tune.evaluate). Returns evaluate's metrics."""
    final = dataclasses.replace(cfg, resmem=dataclasses.replace(cfg.resmem, **summary["best"]))
    ensure_index(final, run)  # the memory the best setting needs
    if cfg.neighbour_transformer.enabled:
        train_neighbour_transformer(final)
    return evaluate(final, tuning=summary) if cfg.tune.evaluate else None


def tune_resmem(cfg: Config) -> dict:
    run = RunDir(cfg.run_dir)
    manifest = read_index_manifest(run, needed_by="tune")
    if manifest.get("codec") == "sparse":
        return tune_token_memory(cfg, run, manifest)
    check_dense(manifest, cfg)  # before any index is rebuilt
    tables = neighbour_tables(cfg, run)
    run.mark_running("tune", cfg.to_dict())
    frame = run_search(cfg, run, tables)
    top = frame.iloc[0]
    best = {p: top[p].item() for p in TUNED}  # per column: a row would upcast k
    best.update(distance=str(top["distance"]), normalize=bool(top["normalize"]))
    summary = tuning_summary(cfg, tables[top["memory"]], best, top["val_accuracy"].item(), len(frame),
                             cfg.tune.search, frame.drop(columns="memory").head(10).to_dict("records"))
    write_json(run.root / "tune" / "best.json", summary)
    plot_search(run.root / "tune", frame)
    knn = summary["knn_interp"]
    log.info(f"{len(frame)} trials; best on val: {best} -> {summary['best_val_accuracy']:.4f} "
             f"(base {summary['base_val_accuracy']:.4f}; kNN interpolation lambda={knn['knn_lambda']}, "
             f"tau={knn['knn_tau']} -> {knn['val_accuracy']:.4f})")
    evaluate_chosen(cfg, run, summary)
    # last: rebuilding the index invalidates the stages after it, tune included
    run.mark_done("tune", cfg.to_dict(), best=best, best_val_accuracy=summary["best_val_accuracy"],
                  trials=len(frame))
    return summary
