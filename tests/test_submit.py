"""`resmem submit` argument checks that need no cluster (the real submissions are in
test_cluster.py)."""

import pytest

from resmem_ray.cli import main


@pytest.mark.parametrize("args, message", [
    (["run", "--config", "jobs/configs/digits.yaml", "run_dir=/abs/run"], "no cluster address"),
    (["transformer", "run_dir=/abs/run"], "no cluster address"),  # every stage can be submitted
    (["sweep", "run_dir=/abs/run"], "no cluster address"),
    (["--address", "http://127.0.0.1:1", "run", "--config", "jobs/configs/digits.yaml"], "is relative"),
    (["--address", "http://127.0.0.1:1", "memorize", "--config", "jobs/configs/digits.yaml",
      "--examples", "new.npz"], "is relative"),
    (["--address", "http://127.0.0.1:1", "run", "train.epochz=1", "run_dir=/abs/run"], "train.epochz"),
    (["--address", "http://127.0.0.1:1", "bogus", "run_dir=/abs/run"], "unknown stage 'bogus'"),
    (["--address", "http://127.0.0.1:1", "--runtime-env", "missing.yaml", "run", "run_dir=/abs/run"],
     "runtime env file not found"),
    (["--address", "http://127.0.0.1:1", "run", "run_dir=/abs/run"], "could not submit to the Ray cluster"),
])
def test_submit_errors_are_one_line(args, message, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resmem: error: ") and message in err and err.count("\n") == 1


def test_the_job_entry_point_refuses_what_is_not_a_stage():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "jobs", "status", "runs/x"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("usage: python -m jobs STAGE") and "| run" in out.stderr
