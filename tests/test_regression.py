"""The fourth task, regression, end to end through `resmem run` and `resmem tune`: RMSE of
the base model, k-NN regression and ResMem, checked against a brute-force numpy computation."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from resmem_ray.cli import main
from resmem_ray.config import load_config
from resmem_ray.core.resmem import kernel_weights
from resmem_ray.store.artifacts import read_split
from resmem_ray.store.rundir import RunDir


@pytest.mark.timeout(400)
def test_linear_simulation_run(ray_session, tmp_path, capsys):
    args = ["--config", "jobs/configs/linear_sim.yaml", f"run_dir={tmp_path / 'run'}", "train.epochs=4",
            "evaluate.knn_ks=[1,10]"]
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "| method | test RMSE |" in out and "| 10-NN regression |" in out
    cfg = load_config(args[1], tuple(args[2:]))
    run = RunDir(cfg.run_dir)
    metrics = json.loads((run.report / "metrics.json").read_text())
    assert metrics["num_test"] == 750 and metrics["memory_rows"] == 1912
    # a linear model cannot fit y's sine; the memory of its residuals gives part of it back
    assert metrics["rmse"]["resmem"] < metrics["rmse"]["base"]

    train = read_split(run, "train", "test", ("id", "label", "embedding", "prediction"))
    test = read_split(run, "test", "test", ("id", "label", "embedding", "prediction"))
    d = np.linalg.norm(test["embedding"][:, None] - train["embedding"][None], axis=2)  # exact l2, no normalising
    order = np.argsort(d, axis=1, kind="stable")
    r, k = cfg.resmem, cfg.resmem.k
    near = order[:, :k]
    w = kernel_weights(np.take_along_axis(d, near, 1), r.sigma)
    resmem = test["prediction"] + r.gate * (w * (train["label"] - train["prediction"])[near]).sum(1)
    preds = pq.read_table(run.report / "predictions.parquet").to_pydict()
    np.testing.assert_allclose(preds["resmem"], resmem, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(preds["knn_10"], train["label"][order[:, :10]].mean(1), rtol=1e-6)
    rmse = np.sqrt(np.mean((resmem - test["label"]) ** 2))
    assert metrics["rmse"]["resmem"] == pytest.approx(rmse, rel=1e-4)

    # `resmem tune` on the same run: k, sigma and the gate chosen by val RMSE, then test once
    grid = ["tune.k=[5,20]", "tune.sigma=[0.1,1.0]", "tune.gate=[0.5,1.0]", "tune.normalize=[false]",
            "tune.cpus_per_trial=0.5"]
    assert main(["tune", *args, *grid]) == 0
    summary = json.loads((run.root / "tune" / "best.json").read_text())
    assert summary["objective"] == "val rmse" and summary["trials"] == 8
    assert summary["best_val_rmse"] == min(t["val_rmse"] for t in summary["top"])
    best = summary["best"]
    assert best["distance"] == "l2" and best["normalize"] is False and best["k"] in (5, 20)
    # the chosen setting's val RMSE, by brute force from the val and train rows
    val = read_split(run, "val", "test", ("id", "label", "embedding", "prediction"))
    d = np.linalg.norm(val["embedding"][:, None] - train["embedding"][None], axis=2)
    near = np.argsort(d, axis=1, kind="stable")[:, :best["k"]]
    w = kernel_weights(np.take_along_axis(d, near, 1), best["sigma"])
    pred = val["prediction"] + best["gate"] * (w * (train["label"] - train["prediction"])[near]).sum(1)
    assert summary["best_val_rmse"] == pytest.approx(np.sqrt(np.mean((pred - val["label"]) ** 2)), rel=1e-4)
    assert summary["best_val_rmse"] < summary["base_val_rmse"]
    tuned = json.loads((run.report / "metrics.json").read_text())  # evaluated once on test at that setting
    assert {k: tuned["resmem"][k] for k in best} == best and tuned["tuning"]["best"] == best
    assert "## Chosen by `resmem tune` on the validation split (8 grid trials, by val rmse" in \
        (run.report / "report.md").read_text()


def test_regression_configs_load():
    cfg = load_config("jobs/configs/diabetes.yaml")
    assert (cfg.data.name, cfg.model.name) == ("diabetes", "mlp")

