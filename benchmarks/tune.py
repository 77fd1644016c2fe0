"""What a Ray Tune sweep over k, sigma, T and the gate costs, against one lookup pass.

`resmem tune` searches the val queries once at the largest k and lets every trial only
reweight the neighbour table. This script measures, in one run and on one memory:

  lookup pass   the val queries searched once through the shard actors (k = max k)
  reweighting   `resmem tune`'s own Ray Tune search (resmem_ray.stages.tune.run_search): a grid of
                200 settings (k x sigma x T x gate)
  naive         a Tune search where every trial searches the memory again, run for a few
                trials (each costs a lookup pass), its per-trial time projected to 200

    python benchmarks/tune.py --rows 1000000 --dim 256 --classes 100 --val 10000

The memory is synthetic (clustered embeddings, logits that favour the right class) but
goes through the real index writer, shard actors and Tune code.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from results import section, write

from resmem_ray.config import Config, IndexConfig, TuneConfig
from resmem_ray.core.knn import Neighbours, prepare_queries
from resmem_ray.runtime.shards import write_shards
from resmem_ray.runtime.shards import ShardedMemory
from resmem_ray.core.resmem import residuals
from resmem_ray.store.rundir import RunDir
from resmem_ray.stages.tune import memory_key, run_search, searched, setting_scores
from resmem_ray.tasks.classification import neighbour_residuals
from resmem_ray.tasks.registry import task_for

K = [10, 20, 30, 50]
SIGMA = [0.01, 0.03, 0.1, 0.3, 1.0]
T = [0.5, 1.0, 2.0, 4.0, 8.0]
GATE = [0.5, 1.0]  # 4 x 5 x 5 x 2 = 200 settings


QUESTION = ("What does `resmem tune`'s search cost against one lookup pass, and against a sweep that searches "
            "again in every trial?")


def synthetic(rows: int, dim: int, classes: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings around one centre per class, logits right about 80% of the time."""
    labels = rng.integers(0, classes, rows)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    emb = centres[labels] + 1.5 * rng.normal(size=(rows, dim)).astype(np.float32)
    logits = rng.normal(size=(rows, classes)).astype(np.float32)
    logits[np.arange(rows), labels] += 2.5
    return emb, labels, logits


def neighbour_table(nb, val_logits, val_labels, train_logits, temperatures) -> dict:
    """What `resmem tune` hands its trials for a dense memory (tasks/classification.py's tune_table)."""
    logits = train_logits[nb.ids]
    return {"val": {"logits": val_logits, "label": val_labels}, "neighbours": nb,
            "residuals_at": {t: neighbour_residuals(logits, nb.labels, t) for t in temperatures}}


def naive_trial(config: dict, cfg, memory, queries, val_logits, val_labels, train_logits, batch: int) -> None:
    """A sweep without reuse: every trial runs its own lookup pass, then reweights."""
    from ray import tune

    nb = memory.search_batches(queries, max(K), batch)
    table = neighbour_table(nb, val_logits, val_labels, train_logits, [config["temperature"]])
    tune.report(setting_scores(cfg, table, config))


def main() -> None:
    import ray
    from ray import tune

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--val", type=int, default=10_000)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--naive-trials", type=int, default=3)
    p.add_argument("--cpus-per-trial", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--out", default="benchmarks/RESULTS.md")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        emb, labels, logits = synthetic(args.rows + args.val, args.dim, args.classes, rng)
        train_emb, val_emb = emb[:args.rows], emb[args.rows:]
        train_logits, val_logits = logits[:args.rows], logits[args.rows:]
        val_labels = labels[args.rows:]
        # the shard actors stay up through both sweeps: leave CPUs for the trials (2 cores here)
        settings = IndexConfig(num_shards=args.shards, cpus_per_shard=1.5 / args.shards)
        (tmp / "index").mkdir()
        t0 = time.time()
        manifest = write_shards(tmp / "index", prepare_queries(train_emb, "l2", True), np.arange(args.rows),
                                labels[:args.rows], residuals(train_logits, labels[:args.rows], 1.0),
                                settings, "l2", True, 1.0)
        build_s = time.time() - t0
        del emb, train_emb
        queries = prepare_queries(val_emb, "l2", True)
        with ShardedMemory(tmp / "index", manifest, settings) as memory:
            t0 = time.time()
            nb = memory.search_batches(queries, max(K), args.batch)
            lookup_s = time.time() - t0
            table = neighbour_table(Neighbours(nb.distances, nb.ids, nb.labels, None), val_logits,  # rows per T
                                    val_labels, train_logits, T)
            del nb
            cfg = Config(tune=TuneConfig(search="grid", k=K, sigma=SIGMA, temperature=T, gate=GATE,
                                         cpus_per_trial=args.cpus_per_trial))
            t0 = time.time()
            frame = run_search(cfg, RunDir(tmp / "run"), task_for(cfg), {memory_key("l2", True): table})
            tune_s = time.time() - t0

            t0 = time.time()
            naive = tune.Tuner(
                tune.with_resources(tune.with_parameters(
                    naive_trial, cfg=cfg, memory=memory, queries=queries, val_logits=val_logits, val_labels=val_labels,
                    train_logits=train_logits, batch=args.batch), {"cpu": args.cpus_per_trial}),
                param_space={"k": tune.grid_search(K[-args.naive_trials:]), "sigma": 0.1, "temperature": 1.0,
                             "gate": 1.0, "gate_threshold": 1.0, "gate_softness": 0.0},
                tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", max_concurrent_trials=1),
                run_config=tune.RunConfig(name="naive", storage_path=str(tmp / "naive"), verbose=0))
            naive_n = len(naive.fit().get_dataframe())
            naive_s = time.time() - t0
    ray.shutdown()
    per_naive = naive_s / naive_n
    lines = section(
        "Tune: reweighting trials vs one lookup pass vs a naive sweep", QUESTION,
        f"Memory: {args.rows:,} x {args.dim} synthetic embeddings, {args.classes} classes, {args.shards} exact "
        f"shard actors (built in {build_s:.0f} s); {args.val:,} val queries at k={max(K)}; "
        f"{args.cpus_per_trial} CPU per trial, trial actors reused.", "",
        "| what | seconds | x one lookup pass |", "| --- | ---: | ---: |",
        f"| one lookup pass over val (k={max(K)}) | {lookup_s:.1f} | 1.00 |",
        f"| `resmem tune` search: {len(frame)} reweighting trials | {tune_s:.1f} | {tune_s / lookup_s:.2f} |",
        f"| naive sweep: {naive_n} trials measured, each searching again | {naive_s:.1f} | {naive_s / lookup_s:.2f} |",
        f"| naive sweep projected to {len(frame)} trials ({per_naive:.1f} s / trial) | {per_naive * len(frame):.0f} "
        f"| {per_naive * len(frame) / lookup_s:.1f} |", "",
        f"Best of the {len(frame)} trials: {frame.iloc[0][list(searched(task_for(cfg)))].to_dict()} -> val accuracy "
        f"{100 * frame['val_accuracy'].iloc[0]:.2f}%. Under 2x one lookup pass: "
        f"{'yes' if tune_s < 2 * lookup_s else 'NO'}.")
    write(args.out, lines)


if __name__ == "__main__":
    main()
