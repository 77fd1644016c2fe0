"""`resmem sweep` (the pipeline per base-model width under ASHA), long-tailed runs and
Optuna search, through the CLI on a real local Ray instance."""

import json

import numpy as np
import pytest

from resmem_ray.cli import main
from resmem_ray.stages.sweep import aggregate

from .conftest import DIGITS_ARGS


@pytest.mark.timeout(900)
def test_width_sweep_over_seeds_reports_every_method_as_mean_and_spread(ray_session, tmp_path):
    run_dir = tmp_path / "sweep"
    assert main(["sweep", "--config", "jobs/configs/digits_sweep.yaml", f"run_dir={run_dir}",
                 "sweep.width=[4]", "sweep.seeds=[0,1]", "sweep.rungs=[2]", "tune.k=[5,10]"]) == 0
    summary = run_dir / "sweep" / "summary"
    results = json.loads((summary / "results.json").read_text())
    rows = results["trials"]
    assert [(row["width"], row["seed"]) for row in rows] == [(4, 0), (4, 1)]
    assert all(0 < row["val_base"] <= 1 and 0 < row["val_resmem"] <= 1 for row in rows)
    finished = [row for row in rows if row["epochs"] == 2]
    assert finished and all(set(row["test"]) >= {"base", "knn_1", "knn_30", "knn_interp", "resmem",
                                                  "learned_gate", "oracle_gate"} for row in finished)
    assert all(set(row["val"]) >= {"base", "knn_30", "knn_interp", "resmem"} for row in finished)
    for group in results["groups"]:  # mean and spread over the seeds that finished
        mine = [row for row in finished if row["width"] == group["width"]]
        assert group["seeds"] == [row["seed"] for row in mine]
        if mine:
            values = np.array([row["test"]["resmem"] for row in mine])
            assert group["test"]["resmem"]["mean"] == pytest.approx(values.mean())
            assert group["test"]["resmem"]["std"] == pytest.approx(values.std(ddof=1) if len(mine) > 1 else 0.0)
            gains = np.array([row["test"]["resmem"] - row["test"]["base"] for row in mine])
            assert group["test_gain"]["mean"] == pytest.approx(gains.mean())
    # each trial is a whole run directory of its own: trained to the last rung it reached, with its seed
    for row in rows:
        run = run_dir / "sweep" / f"width{row['width']}_lr0.05_seed{row['seed']}"
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["stages"]["train"]["epochs_done"] == row["epochs"]
        assert manifest["config"]["model"]["width"] == row["width"] and manifest["config"]["seed"] == row["seed"]
    assert (summary / "width_sweep.png").stat().st_size > 1000
    report = (summary / "report.md").read_text()
    assert "## Test accuracy (%), mean ± standard deviation over seeds" in report
    assert "| kNN interpolation |" in report and "| ResMem - base (points) |" in report


def test_sweep_summary_is_mean_and_spread_per_width_over_the_seeds_that_finished():
    def trial(width, seed, base, resmem):
        scores = None if base is None else {"base": base, "resmem": resmem, "knn_1": 0.5}
        return {"width": width, "lr": 0.1, "seed": seed, "test": scores, "val": scores}

    rows = [trial(2, 0, 0.5, 0.7), trial(2, 1, 0.6, 0.7), trial(2, 2, None, None), trial(8, 0, 0.9, 0.9)]
    narrow, wide = aggregate(rows)
    assert narrow["seeds"] == [0, 1] and narrow["stopped"] == 1
    assert narrow["test"]["resmem"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.0), "n": 2}
    assert narrow["test_gain"]["mean"] == pytest.approx(0.15)
    assert narrow["test_gain"]["std"] == pytest.approx(np.std([0.2, 0.1], ddof=1))
    assert wide["test"]["base"]["n"] == 1 and wide["test"]["base"]["std"] == 0.0


@pytest.mark.timeout(600)
def test_long_tailed_run_reports_head_tail_and_worst_class(digits_run, tmp_path):
    """What a long-tailed memory reports; the base model (the session run's, as a given
    one: no second training) is not what is tested."""
    run_dir = tmp_path / "lt"
    assert main(["run", "--config", "jobs/configs/digits_lt.yaml", f"run_dir={run_dir}", "model.source=checkpoint",
                 f"model.path={digits_run / 'model' / 'model.pt'}"]) == 0
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    counts = np.array(metrics["per_class"]["train_counts"])
    assert counts[0] == counts.max() and counts[-1] == pytest.approx(counts[0] / 10, abs=1)
    assert metrics["memory_rows"] == counts.sum()
    assert set(metrics["per_class"]["head"]) >= {"base", "knn_30", "resmem"}
    report = (run_dir / "report" / "report.md").read_text()
    assert "| head (classes [0, 1, 2, 3, 4])" in report and "| tail (classes [5, 6, 7, 8, 9])" in report
    assert "| worst class |" in report and (run_dir / "report" / "per_class.png").is_file()


@pytest.mark.timeout(600)
def test_optuna_search(run_copy):
    args = [*DIGITS_ARGS, f"run_dir={run_copy}", "tune.search=optuna", "tune.num_samples=8",
            "tune.k=[1,5,10]", "tune.sigma=[0.01,1.0]", "tune.temperature=[1.0,8.0]", "tune.gate=[0.5,1.0]",
            "tune.gate_softness=[0.0,0.1]", "tune.cpus_per_trial=0.5", "tune.evaluate=false"]
    assert main(["tune", *args]) == 0
    summary = json.loads((run_copy / "tune" / "best.json").read_text())
    assert summary["search"] == "optuna" and summary["trials"] == 8
    sampled = [t["sigma"] for t in summary["top"]]
    assert all(0.01 <= s <= 1.0 for s in sampled) and len(set(sampled)) > 1  # drawn from the range
    assert (run_copy / "tune" / "sigma_T_heatmap.png").is_file()
