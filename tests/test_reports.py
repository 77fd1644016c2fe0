"""Reports that warn, and the order of the classification report's rows: unit tests on
fake training histories and metrics (no Ray, no run)."""

import json

import numpy as np

from resmem_ray.config import load_config
from resmem_ray.runtime.trainer import chance_warning
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.classification import paired_change, per_class, training_warnings, write_report
from resmem_ray.tasks.methods import rank as report_rank


def history(*train_acc):
    return [{"epoch": i + 1, "train_loss": 2.3, "train_acc": a, "val_loss": 2.3, "val_acc": a}
            for i, a in enumerate(train_acc)]


def test_chance_warning_on_the_final_train_accuracy():
    warning = chance_warning(history(0.5, 0.12), 10)  # the last epoch counts, not the best
    assert "train accuracy 12.00% vs chance 10.00% (1/10)" in warning
    assert chance_warning(history(0.04), 10) is not None  # below chance
    assert chance_warning(history(0.15), 10) is not None  # 1.5x chance: still "did not learn"
    assert chance_warning(history(0.16), 10) is None
    assert chance_warning(history(0.12, 0.9), 10) is None
    assert chance_warning(history(0.76), 2) is None and chance_warning(history(0.74), 2) is not None
    assert chance_warning([{"epoch": 1, "train_mse": 9.0}], 1) is None  # regression: no accuracy
    assert chance_warning([], 10) is None


def fake_report(tmp_path, train_acc):
    cfg = load_config("jobs/configs/digits.yaml", ("evaluate.knn_ks=[1,10]",))
    run = RunDir(tmp_path / "run")
    run.model.mkdir(parents=True, exist_ok=True)
    (run.model / "history.json").write_text(json.dumps(history(0.3, train_acc)))
    labels = np.arange(20) % 10
    preds = {m: labels for m in ("base", "knn_1", "knn_10", "knn_interp", "resmem", "oracle_gate")}
    preds = dict(sorted(preds.items(), key=lambda item: report_rank(item[0])))
    right = np.ones(20, bool)
    metrics = {"accuracy": {m: 1.0 for m in preds}, "vs_base": {m: paired_change(right, right) for m in preds},
               "num_test": 20, "memory_rows": 100, "num_shards": 2, "memory_footprint": "80 bytes per row on disk",
               "knn_interp": {"lambda": 0.25, "tau": 0.1, "k": 10, "chosen_by": "config"},
               "warnings": training_warnings(run, 10), "per_class": per_class(labels, preds, np.full(10, 10))}
    write_report(tmp_path, cfg, metrics, "small_cnn")
    return (tmp_path / "report.md").read_text().splitlines()


def test_report_warns_near_the_top_when_the_base_model_did_not_learn(tmp_path):
    lines = fake_report(tmp_path, 0.11)
    warning = [i for i, line in enumerate(lines) if line.startswith("> **Warning:**")]
    assert warning == [2] and "train accuracy 11.00% vs chance 10.00%" in lines[2]
    assert not any("Warning" in line for line in fake_report(tmp_path, 0.9))


def test_knn_interpolation_row_after_knn_before_resmem(tmp_path):
    rows = [line.split("|")[1].strip() for line in fake_report(tmp_path, 0.9) if line.startswith("| ")]
    assert rows[2:8] == ["base model", "1-NN", "10-NN", "kNN interpolation", "ResMem", "oracle gate (base or 1-NN)"]
    assert report_rank("knn_interp") > report_rank("knn_30") and report_rank("knn_interp") < report_rank("resmem")
