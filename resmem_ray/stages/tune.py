"""Stage tune: Ray Tune over the resmem keys the task searches (`Task.tune_keys`:
classification k, sigma, T, the gate and the distance; the token LM and regression k,
sigma, the gate and the distance), each trial scored on val by the task's objective (val
accuracy, val perplexity, val RMSE).

Which neighbours a query has does not depend on sigma, T or the gate. So the val queries
are searched once per (distance, normalize) pair at the largest k of the space, a chunk
of val at a time; each neighbour table (the val rows, their neighbours and what the task
adds: a dense memory's residual rows at each T) is written to disk as it comes, and every
trial (on the driver's node, where the files are) memory-maps it and only reweights it:
hundreds of trials cost about one lookup pass, and no table is held whole in RAM.

After the search: each baseline the task tunes (tasks/methods.py) gets its own setting on
val at the chosen k and T from the same neighbour table, the task fits what it fits on val
(a learned gate), the index is rebuilt at the chosen T / distance if needed, the neighbour
Transformer is trained when enabled, and `evaluate` runs once on test. The test split is
read only there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import itertools
import math
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np

from resmem_ray.core.knn import Neighbours, prepare_queries
from resmem_ray.errors import ResMemError
from resmem_ray.log import stage_log, verbose
from resmem_ray.runtime.shards import ShardedMemory
from resmem_ray.schema import Config
from resmem_ray.stages.evaluate import evaluate
from resmem_ray.stages.index import build_index
from resmem_ray.stages.transformer import train_neighbour_transformer
from resmem_ray.store.artifacts import (DiskTable, check_codec, check_k, open_disk_table, read_index_manifest,
                                        split_chunks, split_row_groups)
from resmem_ray.store.files import write_json
from resmem_ray.store.rundir import RunDir, StageSteps, stage_entry
from resmem_ray.tasks.methods import SCORES, title
from resmem_ray.tasks.registry import Task, task_for

log = stage_log("tune")

MEMORY = ("distance", "normalize")  # these change the neighbours: one index and one val search each
SAMPLED = {"sigma": "loguniform", "temperature": "loguniform", "gate": "uniform", "gate_threshold": "uniform",
           "gate_softness": "uniform"}  # random and optuna search: k is a choice of tune.k


def memory_key(distance: str, normalize: bool) -> str:
    """A memory's name: its distance and whether its rows are normalised (cosine always is)."""
    return "cosine" if distance == "cosine" else f"{distance}/{'normalized' if normalize else 'raw'}"


def searched(task: Task) -> tuple[str, ...]:
    """The keys a trial reweights (the memory's keys pick its neighbour table instead)."""
    return tuple(k for k in task.tune_keys if k not in MEMORY)


def with_setting(cfg: Config, setting: dict) -> Config:
    return dataclasses.replace(cfg, resmem=dataclasses.replace(cfg.resmem, **setting))


def neighbour_table(cfg: Config, run: RunDir, folder: Path, with_knn_ks: bool = False) -> dict:
    """The val split's nearest memory rows in the current index, at the largest tune.k (and
    evaluate.knn_ks), with what the task's trials read besides: searched a chunk of val at a
    time (evaluate.chunk_mb), written to `folder` as it comes (store/artifacts.DiskTable)
    and returned memory-mapped."""
    task = task_for(cfg)
    manifest = read_index_manifest(run, needed_by="tune")
    check_codec(run, manifest, task.codec, task.name)
    ks = {"tune.k": cfg.tune.k, "tune.knn_k": cfg.tune.knn_k,
          "evaluate.knn_ks": cfg.evaluate.knn_ks if with_knn_ks else []}
    k_max = max(k for values in ks.values() for k in values)
    check_k(k_max, manifest["rows"], "config key " + next(key for key, values in ks.items() if k_max in values))
    groups = split_row_groups(run, "val", "tune", task.query_columns)
    rows = sum(g["rows"] for g in groups)
    if not rows:
        raise ResMemError(f"{run.embeddings / 'val'} holds no rows: `resmem tune` chooses on val")
    log.info(f"searching {rows} val queries once at k={k_max} "
             f"({memory_key(manifest['distance'], manifest['normalize'])}, T={manifest['temperature']})")
    table = DiskTable(folder, rows)
    with ShardedMemory(run.index, manifest, cfg.index) as memory:
        for val in split_chunks(run.root, groups, task.query_columns, int(cfg.evaluate.chunk_mb * 2**20)):
            embedding = val.pop("embedding")
            val["embedding_norm"] = np.linalg.norm(embedding, axis=1)  # a retrieval gate's feature (tasks/lm.py)
            queries = prepare_queries(embedding, manifest["distance"], manifest["normalize"])
            nb = memory.search_batches(queries, k_max, cfg.evaluate.batch_size)
            table.append({"val": val, "neighbours": dataclasses.asdict(nb), **task.tune_table(cfg, run, val, nb)})
    return with_neighbours(table.close())


def with_neighbours(table: dict) -> dict:
    """A neighbour table read back from disk, its neighbours as Neighbours again."""
    return {**table, "neighbours": Neighbours(**table["neighbours"])}


@functools.lru_cache(maxsize=4)
def opened_table(folder: str) -> dict:
    """A neighbour table a trial reads: memory-mapped once per process (trial actors are reused)."""
    return with_neighbours(open_disk_table(Path(folder)))


def ensure_index(cfg: Config, run: RunDir, keys=("temperature", *MEMORY)) -> None:
    """Rebuild the index unless it already has cfg's values of these resmem keys."""
    manifest = read_index_manifest(run, needed_by="tune")
    if any(manifest[key] != getattr(cfg.resmem, key) for key in keys):
        build_index(dataclasses.replace(cfg, resmem=dataclasses.replace(
            cfg.resmem, **{key: manifest[key] for key in ("temperature", *MEMORY) if key not in keys})))


def memory_pairs(cfg: Config, task: Task) -> list[tuple[str, bool]]:
    """The (distance, normalize) pairs searched: tune.distance x tune.normalize where the
    task searches them, else the config's own; cosine once (normalize changes nothing there)."""
    r, t = cfg.resmem, cfg.tune
    pairs = itertools.product(t.distance if "distance" in task.tune_keys else [r.distance],
                              t.normalize if "normalize" in task.tune_keys else [r.normalize])
    memories = {}
    for pair in pairs:
        memories.setdefault(memory_key(*pair), pair)
    return list(memories.values())


def neighbour_tables(cfg: Config, run: RunDir, task: Task, folder: Path) -> dict[str, str]:
    """One neighbour table per (distance, normalize) pair of the search space, each in its
    own folder under `folder`: {memory key: its folder}."""
    tables = {}
    for i, (distance, normalize) in enumerate(memory_pairs(cfg, task)):
        pair_cfg = with_setting(cfg, {"distance": distance, "normalize": normalize})
        ensure_index(pair_cfg, run, keys=MEMORY)
        neighbour_table(pair_cfg, run, folder / f"memory-{i}")
        tables[memory_key(distance, normalize)] = str(folder / f"memory-{i}")
    return tables


def setting_scores(cfg: Config, table: dict, setting: dict) -> dict[str, float]:
    """ResMem's val scores at this setting of the searched keys, from the table alone."""
    task = task_for(cfg)
    return task.val_scores(with_setting(cfg, {k: setting[k] for k in searched(task)}), table, ("resmem",))["resmem"]


def better(task: Task, score: float, than: float | None) -> bool:
    return than is None or (score > than if task.mode == "max" else score < than)


def best_on_grid(cfg: Config, table: dict) -> tuple[dict, float]:
    """The best setting of tune.*'s grid on one neighbour table and its objective, in
    process: for callers that are already a Ray Tune trial (`resmem sweep`). Ties keep the
    first setting met."""
    task = task_for(cfg)
    keys, objective = searched(task), task.scores[0]
    best, best_score = None, None
    for values in itertools.product(*(getattr(cfg.tune, p) for p in keys)):
        setting = dict(zip(keys, values))
        score = setting_scores(cfg, table, setting)[objective]
        if better(task, score, best_score):
            best, best_score = setting, score
    return best, best_score


def trial(config: dict, cfg: Config, tables: dict[str, str]) -> None:
    """One Ray Tune trial: reweight, score, report once (no scheduler can help here)."""
    from ray import tune

    tune.report(setting_scores(cfg, opened_table(tables[config["memory"]]), config))


def search_space(cfg: Config, task: Task, memories: list[str]) -> tuple[dict, int, object]:
    """(param_space, num_samples, search_alg) for tune.search = grid | random | optuna."""
    from ray import tune

    t = cfg.tune
    if t.search == "grid":
        space = {p: tune.grid_search(getattr(t, p)) for p in searched(task)}
        return {**space, "memory": tune.grid_search(memories)}, 1, None
    space = {"memory": tune.choice(memories) if len(memories) > 1 else memories[0]}
    for p in searched(task):
        lo, hi = min(getattr(t, p)), max(getattr(t, p))
        space[p] = tune.choice(t.k) if p == "k" else lo if lo == hi else getattr(tune, SAMPLED[p])(lo, hi)
    if t.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return space, t.num_samples, OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    return space, t.num_samples, None


def run_search(cfg: Config, run: RunDir, task: Task, tables: dict[str, str]) -> "pandas.DataFrame":  # noqa: F821
    """Every trial's setting and val scores, best first (ties in the order Ray Tune ran them)."""
    import ray
    from ray import tune

    keys, objective = searched(task), task.scores[0]
    space, samples, search_alg = search_space(cfg, task, list(tables))
    # the tables are files on this host: the trials run here (a sliver of its node resource)
    here = {"cpu": cfg.tune.cpus_per_trial, f"node:{ray.util.get_node_ip_address()}": 0.001}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, cfg=cfg, tables=tables), here),
        param_space=space,
        # trials are cheap reweightings: reusing trial actors saves a process start per trial
        tune_config=tune.TuneConfig(metric=objective, mode=task.mode, num_samples=samples, search_alg=search_alg,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="search", storage_path=str(run.root / "tune"), verbose=0))
    # Ray Tune prints its experiment banner and paths whatever `verbose` says: Ray's lines, kept for --verbose
    with contextlib.nullcontext() if verbose() else contextlib.redirect_stdout(io.StringIO()):
        results = tuner.fit()
    frame = results.get_dataframe().sort_values(objective, ascending=task.mode == "min", kind="stable")
    frame = frame.rename(columns={f"config/{p}": p for p in (*keys, "memory")})
    if "memory" not in frame:
        frame["memory"] = list(tables)[0]
    pairs = {memory_key(d, n): (d, n) for d, n in memory_pairs(cfg, task)}
    frame["distance"] = [pairs[m][0] for m in frame["memory"]]
    frame["normalize"] = [pairs[m][1] for m in frame["memory"]]
    frame = frame[[*keys, *MEMORY, "memory", *task.scores]]
    return frame.astype({p: int if p == "k" else float for p in keys}).reset_index(drop=True)


def plot_search(folder, frame, task: Task) -> str:
    """<objective>_vs_k.png (best over the rest per k) and a heatmap of sigma against T (or
    the gate, where T is not searched); returns the heatmap's file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objective = task.scores[0]
    label, scale = f"best {SCORES[objective][0]}", 100 if objective == "val_accuracy" else 1
    best = "max" if task.mode == "max" else "min"
    per_k = frame.groupby("k")[objective].agg(best)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(per_k.index, scale * per_k.values, "o-")
    ax.set_xlabel("k")
    ax.set_ylabel(label)
    ax.set_title("ResMem on val: best setting per k")
    fig.tight_layout()
    _save(fig, folder / f"{objective}_vs_k.png")

    across, short = ("temperature", "T") if "temperature" in frame else ("gate", "gate")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if frame["sigma"].nunique() <= 12 and frame[across].nunique() <= 12:  # a grid
        grid = frame.pivot_table(index="sigma", columns=across, values=objective, aggfunc=best)
        im = ax.imshow(scale * grid.values, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(grid.shape[1]), [f"{t:g}" for t in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{s:g}" for s in grid.index])
        mid = scale * np.nanmean([np.nanmin(grid.values), np.nanmax(grid.values)])
        for (i, j), v in np.ndenumerate(scale * grid.values):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w" if v < mid else "k")
    else:  # sampled: one dot per trial
        im = ax.scatter(frame[across], frame["sigma"], c=scale * frame[objective], cmap="viridis")
        ax.set_xscale("log" if across == "temperature" else "linear")
        ax.set_yscale("log")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_xlabel("T (softmax temperature)" if across == "temperature" else "gate")
    ax.set_ylabel("sigma (kernel temperature)")
    ax.set_title(f"ResMem on val: sigma x {short} (best over the rest)")
    fig.tight_layout()
    name = f"sigma_{short}_heatmap.png"
    _save(fig, folder / name)
    return name


def _save(fig, path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def tune_baseline(cfg: Config, table: dict, method) -> dict:
    """A baseline tuned on val like ResMem: the best setting of its tune.<key> grid at cfg's
    (ResMem's chosen) T, from the same neighbour table, by the task's objective; an empty
    tune.knn_k keeps ResMem's chosen k. Ties keep the first setting met; a non-finite score
    (lambda=1 drops the model: infinite perplexity) never wins."""
    task = task_for(cfg)
    objective = task.scores[0]
    grid = [getattr(cfg.tune, key) or [cfg.resmem.k] if key == "knn_k" else getattr(cfg.tune, key)
            for key in method.tuned]
    best, best_scores = None, None
    for values in itertools.product(*grid):
        setting = dict(zip(method.tuned, values))
        scores = task.val_scores(with_setting(cfg, setting), table, (method.key,))[method.key]
        if math.isfinite(scores[objective]) and better(task, scores[objective],
                                                        None if best is None else best_scores[objective]):
            best, best_scores = setting, scores
    if best is None:
        raise ResMemError(f"every {title(method.key, task.name)} setting of "
                          f"{' x '.join(f'tune.{key}' for key in method.tuned)} gives a non-finite {objective}")
    return {**best, "temperature": cfg.resmem.temperature, **best_scores, "trials": math.prod(map(len, grid))}


def tuning_summary(cfg: Config, table: dict, best: dict, best_scores: dict, trials: int, search: str,
                   top: list[dict], untuned: dict | None = None, other_memories: dict | None = None) -> dict:
    """What evaluate reports of a search: the chosen setting (with the tuned baselines'
    settings merged in, so that the config of the evaluation holds them all), its val
    scores and the base model's, and what the task fits on val from the same table.
    Each tuned baseline is also tuned on the other memories searched ({memory key: its
    table}), so that a report can say where it would have done better."""
    task = task_for(cfg)
    chosen = with_setting(cfg, best)
    base = task.val_scores(chosen, table, ("base",))["base"]
    summary = {"best": dict(best), "searched": list(task.tune_keys), "scores": list(task.scores),
               "objective": task.scores[0].replace("_", " "), "trials": trials, "search": search, "top": top,
               **{f"best_{s}": best_scores[s] for s in task.scores}, **{f"base_{s}": base[s] for s in task.scores}}
    if untuned:
        summary["untuned"] = untuned
    for method in task.tuned_baselines():
        summary[method.key] = tune_baseline(chosen, table, method)
        summary["best"].update({key: summary[method.key][key] for key in method.tuned})
        if other_memories:
            summary[method.key]["other_memories"] = {key: tune_baseline(chosen, other, method)
                                                     for key, other in other_memories.items()}
    summary.update(task.fit_on_val(chosen, table))
    return summary


def evaluate_chosen(cfg: Config, run: RunDir, summary: dict) -> dict | None:
    """Rebuild the index for the chosen setting if needed, train the neighbour Transformer
    when enabled, and evaluate once on test (tune.evaluate). Returns evaluate's metrics."""
    final = with_setting(cfg, summary["best"])
    ensure_index(final, run)  # the memory the best setting needs
    if cfg.neighbour_transformer.enabled:
        train_neighbour_transformer(final)
    return evaluate(final, tuning=summary) if cfg.tune.evaluate else None


@stage_entry("tune")
def tune_resmem(cfg: Config) -> StageSteps:
    task = task_for(cfg)
    if not task.tune_keys:
        raise ResMemError(f"the {task.name} task (model.name={cfg.model.name}) is not tuned by `resmem tune`: "
                          "set resmem.* and run `resmem evaluate`")
    run = RunDir(cfg.run_dir)
    check_codec(run, read_index_manifest(run, needed_by="tune"), task.codec, task.name)  # before any rebuild
    scratch = Path(tempfile.mkdtemp(prefix=".tune-tables-", dir=run.root))  # the neighbour tables, dropped at the end
    try:
        tables = neighbour_tables(cfg, run, task, scratch)
        yield run
        return search_and_evaluate(cfg, run, task, tables)
    finally:
        opened_table.cache_clear()
        shutil.rmtree(scratch, ignore_errors=True)


def search_and_evaluate(cfg: Config, run: RunDir, task: Task, tables: dict[str, str]) -> tuple[dict, dict]:
    """The search over the neighbour tables, the summary, and evaluate at the chosen setting."""
    frame = run_search(cfg, run, task, tables)
    top = frame.iloc[0]
    best = {p: top[p].item() for p in searched(task)}  # per column: a row would upcast k
    best.update(distance=str(top["distance"]), normalize=bool(top["normalize"]))
    own = memory_key(cfg.resmem.distance, cfg.resmem.normalize)
    config_setting = {p: getattr(cfg.resmem, p) for p in searched(task)}
    scored = own in tables and cfg.resmem.k <= max(cfg.tune.k)  # its memory and its neighbours are in a table
    untuned = ({**config_setting, **setting_scores(cfg, opened_table(tables[own]), config_setting)} if scored
               else None)
    best_table = opened_table(tables[top["memory"]])
    others = {key: opened_table(folder) for key, folder in tables.items() if key != top["memory"]}
    summary = tuning_summary(cfg, best_table, best, {s: top[s].item() for s in task.scores}, len(frame),
                             cfg.tune.search, frame.drop(columns="memory").head(10).to_dict("records"), untuned,
                             others)
    # the best setting at each k on the chosen memory (the frame is best first): what a smaller,
    # cheaper k gives up, at its own best kernel rather than the chosen k's
    summary["best_per_k"] = (frame[frame["memory"] == top["memory"]].drop_duplicates("k").drop(columns="memory")
                             .sort_values("k").to_dict("records"))
    summary["heatmap"] = plot_search(run.root / "tune", frame, task)
    write_json(run.root / "tune" / "best.json", summary)
    phrase = lambda scores: ", ".join(SCORES[s][2](scores[s]) for s in task.scores)  # noqa: E731
    baselines = "".join(f"; {title(m.key, task.name)} "
                        + ", ".join(f"{short}={summary[m.key][key]}" for key, short in m.tuned.items())
                        + f" -> {phrase(summary[m.key])}" for m in task.tuned_baselines())
    log.info(f"{len(frame)} trials; best on val: {summary['best']} -> "
             f"{phrase({s: summary[f'best_{s}'] for s in task.scores})} "
             f"(base {phrase({s: summary[f'base_{s}'] for s in task.scores})}{baselines})")
    evaluate_chosen(cfg, run, summary)
    # the entry closes last: rebuilding the index invalidates the stages after it, tune included
    objective = task.scores[0]
    return summary, {"best": summary["best"], "trials": len(frame), f"best_{objective}": summary[f"best_{objective}"]}

