"""`resmem tune`: Ray Tune over k, sigma, T, gate on val; test read only at the end."""

import json

import numpy as np
import pytest

import resmem_ray.store.artifacts
import resmem_ray.stages.evaluate
import resmem_ray.stages.index
import resmem_ray.stages.transformer
import resmem_ray.stages.tune
from resmem_ray.cli import main
from resmem_ray.config import load_config
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.methods import METHODS
from resmem_ray.tasks.registry import task_for

from .conftest import DIGITS_ARGS

SPACE = ["tune.k=[1,5,10]", "tune.sigma=[0.03,0.3]", "tune.temperature=[1.0,4.0]", "tune.gate=[1.0]",
         "tune.gate_threshold=[0.9,1.0]", "tune.distance=[l2,cosine]", "tune.cpus_per_trial=0.5",
         "neighbour_transformer.enabled=true", "neighbour_transformer.epochs=2"]


def test_tune_picks_on_val_and_reads_test_only_in_the_final_evaluation(run_copy, tmp_path, monkeypatch):
    reads = []

    def spy(module, name):
        real = getattr(resmem_ray.store.artifacts, name)

        def read(run, split, *args, **kwargs):
            reads.append((module, split))
            return real(run, split, *args, **kwargs)
        return read

    # (index reads no split: its shard tasks read the train split's rows; tune and evaluate
    # stream theirs from its row groups)
    for module, name in ((resmem_ray.stages.tune, "split_row_groups"), (resmem_ray.stages.evaluate, "split_row_groups"),
                         (resmem_ray.stages.transformer, "read_split")):
        monkeypatch.setattr(module, name, spy(module.__name__.split(".")[-1], name))
    args = [*DIGITS_ARGS, f"run_dir={run_copy}", *SPACE]
    assert main(["tune", *args]) == 0

    # test is read by the final evaluation only, after every read of val
    test_reads = [i for i, (_, split) in enumerate(reads) if split == "test"]
    assert test_reads and all(reads[i][0] == "evaluate" for i in test_reads)
    assert max(i for i, (_, split) in enumerate(reads) if split == "val") < min(test_reads)

    summary = json.loads((run_copy / "tune" / "best.json").read_text())
    assert summary["trials"] == 48 and len(summary["top"]) == 10
    assert {t["distance"] for t in summary["top"]} <= {"l2", "cosine"}
    best = summary["best"]
    assert summary["best_val_accuracy"] == max(t["val_accuracy"] for t in summary["top"])
    # the trial's score is the reweighting of one shared neighbour table: recompute it
    cfg = load_config("jobs/configs/digits.yaml", (*DIGITS_ARGS[2:], f"run_dir={run_copy}", *SPACE))
    tune = resmem_ray.stages.tune
    table = tune.neighbour_table(tune.with_setting(cfg, {"distance": best["distance"], "normalize": best["normalize"]}),
                                 RunDir(run_copy), tmp_path / "table")
    assert isinstance(table["val"]["logits"], np.memmap)  # on disk, memory-mapped
    assert not list(run_copy.glob(".tune-tables-*"))  # the search's tables are gone with it
    # every T of the grid has its residual rows computed once, up front: no trial recomputes them
    assert set(table["residuals_at"]) >= set(cfg.tune.temperature) and "neighbour_logits" not in table
    score = tune.setting_scores(cfg, table, best)["val_accuracy"]
    assert score == pytest.approx(summary["best_val_accuracy"])
    # the best setting at each k of the grid, on the chosen memory: the chosen k's is the best,
    # and a smaller k's is its own best, scored on the same table
    per_k = summary["best_per_k"]
    assert [row["k"] for row in per_k] == [1, 5, 10]
    assert {row["distance"] for row in per_k} == {best["distance"]}
    assert next(row for row in per_k if row["k"] == best["k"])["val_accuracy"] == summary["best_val_accuracy"]
    smallest = {key: per_k[0][key] for key in best if key in per_k[0]}
    assert tune.setting_scores(cfg, table, smallest)["val_accuracy"] == pytest.approx(per_k[0]["val_accuracy"])
    # the in-process grid (what a sweep trial uses) finds the same best score on that table
    assert tune.best_on_grid(cfg, table)[1] == pytest.approx(summary["best_val_accuracy"])
    assert 0 < summary["learned_gate"]["val_accuracy"] <= 1
    # the kNN interpolation baseline is tuned on val too, from the same table, at ResMem's T and
    # (tune.knn_k empty) its k
    knn = summary["knn_interp"]
    assert (knn["knn_k"], knn["temperature"], knn["trials"]) == (best["k"], best["temperature"], 25)
    assert knn["knn_lambda"] in cfg.tune.knn_lambda and knn["knn_tau"] in cfg.tune.knn_tau
    others = knn.pop("other_memories")  # and on the memory it did not choose, for the report
    assert knn == tune.tune_baseline(tune.with_setting(cfg, best), table, METHODS["knn_interp"])
    assert list(others) == [m for m in ("l2/normalized", "cosine") if m != tune.memory_key(best["distance"], True)]

    metrics = json.loads((run_copy / "report" / "metrics.json").read_text())
    assert {k: metrics["resmem"][k] for k in best} == best
    assert metrics["knn_interp"] == {"lambda": knn["knn_lambda"], "tau": knn["knn_tau"], "k": best["k"],
                                     "chosen_by": "tune"}
    index = json.loads((run_copy / "index" / "manifest.json").read_text())
    assert index["temperature"] == best["temperature"]
    report = (run_copy / "report" / "report.md").read_text()
    assert "Chosen by `resmem tune` on the validation split (48 grid trials" in report
    for row in ("| base model |", "| 1-NN |", "| 10-NN |", "| 20-NN |", "| 30-NN |", "| neighbour Transformer |",
                "| ResMem |", "| ResMem, learned gate |", "| oracle gate (base or 1-NN) |", "| kNN interpolation |",
                "chosen by `resmem tune` on val"):
        assert row in report
    for plot in ("val_accuracy_vs_k.png", "sigma_T_heatmap.png"):
        assert (run_copy / "tune" / plot).stat().st_size > 1000
    stages = RunDir(run_copy).manifest()["stages"]
    assert all(stages[s]["status"] == "done" for s in ("transformer", "tune", "evaluate"))


def test_tune_k_larger_than_memory(run_copy, capsys):
    assert main(["tune", *DIGITS_ARGS, f"run_dir={run_copy}", "tune.k=[5,99999]"]) == 2
    assert "k=99999 (config key tune.k) is larger than the memory" in capsys.readouterr().err


def test_each_memory_is_searched_once():
    """tune.distance x tune.normalize, with cosine once: it normalises either way."""
    tune = resmem_ray.stages.tune
    cfg = load_config("jobs/configs/bbc_lm.yaml", ("tune.distance=[cosine,sqeuclidean]", "tune.normalize=[true,false]"))
    pairs = tune.memory_pairs(cfg, task_for(cfg))
    assert pairs == [("cosine", True), ("sqeuclidean", True), ("sqeuclidean", False)]
    assert [tune.memory_key(*p) for p in pairs] == ["cosine", "sqeuclidean/normalized", "sqeuclidean/raw"]
