"""`resmem sweep` (the pipeline per base-model width under ASHA), long-tailed runs and
Optuna search, through the CLI on a real local Ray instance."""

import json

import numpy as np
import pytest

from resmem_ray.cli import main

from .conftest import DIGITS_ARGS


@pytest.mark.timeout(900)
def test_width_sweep_runs_the_pipeline_per_width_and_draws_its_plot(ray_session, tmp_path):
    run_dir = tmp_path / "sweep"
    assert main(["sweep", "--config", "jobs/configs/digits_sweep.yaml", f"run_dir={run_dir}",
                 "sweep.width=[2,4]", "sweep.rungs=[1,2]", "tune.k=[5,10]"]) == 0
    summary = run_dir / "sweep" / "summary"
    rows = json.loads((summary / "results.json").read_text())
    assert [row["width"] for row in rows] == [2, 4]
    assert all(0 < row["val_base"] <= 1 and 0 < row["val_resmem"] <= 1 for row in rows)
    finished = [row for row in rows if row["epochs"] == 2]
    assert finished and all(row["test_resmem"] is not None for row in finished)
    # each trial is a whole run directory of its own: trained to the last rung it reached
    for row in rows:
        manifest = json.loads((run_dir / "sweep" / f"width{row['width']}_lr0.05" / "manifest.json").read_text())
        assert manifest["stages"]["train"]["epochs_done"] == row["epochs"]
        assert manifest["config"]["model"]["width"] == row["width"]
    assert (summary / "width_sweep.png").stat().st_size > 1000
    assert "| width | lr | epochs |" in (summary / "report.md").read_text()


@pytest.mark.timeout(600)
def test_long_tailed_run_reports_head_tail_and_worst_class(ray_session, tmp_path):
    run_dir = tmp_path / "lt"
    assert main(["run", "--config", "jobs/configs/digits_lt.yaml", f"run_dir={run_dir}", "train.epochs=2",
                 "train.num_workers=1", "train.cpus_per_worker=0.5"]) == 0
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
