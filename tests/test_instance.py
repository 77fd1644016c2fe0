"""Two experiments at once on one machine: each `resmem` command talks to its own Ray
instance only (runtime/instance.py)."""

import json
import os
import subprocess
import sys

import pytest

from resmem_ray.runtime import instance

# Tiny runs: one Train worker, one Ray Data actor, one shard, small CPU shares, so two fit
# on 2 cores beside the test session's instance. Distinct sizes tell their reports apart.
TINY = ["--config", "jobs/configs/digits.yaml", "train.epochs=1", "neighbour_transformer.enabled=false",
        "train.num_workers=1", "train.cpus_per_worker=0.25", "embed.num_actors=1", "embed.cpus_per_actor=0.25",
        "index.num_shards=1", "index.cpus_per_shard=0.25"]


@pytest.mark.timeout(300)
def test_two_runs_at_once_each_on_its_own_instance(ray_session, tmp_path):
    """The session's instance runs too, so each command finds more than one on the machine.
    `a` runs the whole pipeline (Ray Train, Ray Data, tasks, actors); `b` trains only, at the
    same time as `a` trains (Ray Train's placement-group cleaner is what looked the instance up)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", instance.BOUND, "RAY_SERVE_THROUGHPUT_OPTIMIZED")}
    commands = {"a": ("run", 100), "b": ("train", 140)}
    procs = {name: subprocess.Popen([sys.executable, "-m", "resmem_ray.cli", command, *TINY, f"data.limit={limit}",
                                     f"run_dir={tmp_path / name}"], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env=env)
             for name, (command, limit) in commands.items()}
    outs = {name: p.communicate(timeout=280)[0] for name, p in procs.items()}
    for name, out in outs.items():
        assert procs[name].returncode == 0, out[-3000:]
        assert "Traceback" not in out and "multiple active Ray instances" not in out, out[-3000:]
    metrics = json.loads((tmp_path / "a" / "report" / "metrics.json").read_text())
    assert metrics["memory_rows"] == 100
    report = (tmp_path / "a" / "report" / "report.md").read_text()
    assert "Test split: 100 examples" in report and report in outs["a"]
    trained = json.loads((tmp_path / "b" / "manifest.json").read_text())["stages"]
    assert trained["train"]["status"] == "done" and "embed" not in trained
    assert "epoch 1/1" in outs["b"]


def test_a_local_instance_is_told_from_a_cluster(monkeypatch):
    monkeypatch.delenv(instance.BOUND, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert instance.local_instance()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster the user named
    assert not instance.local_instance()
    monkeypatch.setenv(instance.BOUND, "10.0.0.1:6379")  # the command's own, named by bind()
    assert instance.local_instance()
