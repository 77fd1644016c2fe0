"""Against a real Ray head (`ray start --head` on loopback, token authentication on, as
Ray 2.60's default): `resmem submit` of the digits pipeline, and a driver killed in the
middle of training whose rerun resumes from Ray Train's last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .ray_head import RayHead

ROOT = Path(__file__).resolve().parents[1]
RESMEM = str(Path(sys.executable).parent / "resmem")
FAST = ["train.num_workers=1", "train.cpus_per_worker=0.5", "embed.num_actors=1", "embed.cpus_per_actor=0.5",
        "index.cpus_per_shard=0.25"]


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead(num_cpus=2)
    try:
        yield head
    finally:
        head.stop()


@pytest.mark.timeout(400)
def test_submit_digits_pipeline(ray_head, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [RESMEM, "submit", "--address", ray_head.dashboard, "--working-dir", str(ROOT),
           "run", "--config", "jobs/configs/digits.yaml", "train.epochs=1", *FAST, f"run_dir={run_dir}"]
    out = subprocess.run(cmd, env=ray_head.env, cwd=ROOT, capture_output=True, text=True, timeout=380)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout.splitlines()[-1]
    print(out.stdout[-4000:])
    assert "| ResMem |" in out.stdout and "[train] epoch 1/1" in out.stdout  # the job's streamed logs
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert metrics["accuracy"]["base"] > 0.3 and metrics["num_test"] == 449


def test_submit_with_a_wrong_token_is_refused(ray_head, tmp_path):
    env = {**ray_head.env, "RAY_AUTH_TOKEN": "0" * 64}
    cmd = [RESMEM, "submit", "--address", ray_head.dashboard, "--working-dir", str(ROOT),
           "train", "--config", "jobs/configs/digits.yaml", f"run_dir={tmp_path}"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("resmem: error: could not submit") and "uthentication" in out.stderr
