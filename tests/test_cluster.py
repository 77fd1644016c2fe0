"""Against a real Ray head (`ray start --head` on loopback, token authentication on, as
Ray 2.60's default) and a real S3-protocol server (moto, on loopback): `resmem submit`
of the digits pipeline into an s3:// run directory, a rerun that skips the finished
stages, and a driver killed in the middle of training whose rerun resumes from Ray
Train's last checkpoint in S3. Both servers are started and stopped here."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .ray_head import MotoS3, RayHead

ROOT = Path(__file__).resolve().parents[1]
RESMEM = str(Path(sys.executable).parent / "resmem")
FAST = ["train.num_workers=1", "train.cpus_per_worker=0.5", "embed.num_actors=1", "embed.cpus_per_actor=0.5",
        "index.cpus_per_shard=0.25"]
STAGES = ("train", "embed", "index", "evaluate")


@pytest.fixture(scope="module")
def ray_head(s3, tmp_path_factory):
    # the cluster's nodes hold the object store's credentials (an instance role on AWS)
    env = {**MotoS3.CREDENTIALS, "RESMEM_CACHE": str(tmp_path_factory.mktemp("cluster-cache"))}
    head = RayHead(num_cpus=2, env=env)
    try:
        yield head
    finally:
        head.stop()


def driver_env(head: RayHead, cache: Path) -> dict:
    """A driver on the cluster (as inside a Ray job), with a local mirror of its own."""
    return {**head.env, "RAY_ADDRESS": head.gcs, "RESMEM_CACHE": str(cache)}


@pytest.mark.timeout(420)
def test_submit_pipeline_to_s3_then_rerun_skips_finished_stages(ray_head, s3, tmp_path):
    run = s3.uri("runs/digits")
    args = ["run", "--config", "jobs/configs/digits.yaml", "train.epochs=1", "neighbour_transformer.enabled=false", *FAST,
            f"run_dir={run}"]
    cmd = [RESMEM, "submit", "--address", ray_head.dashboard, "--working-dir", str(ROOT), *args]
    out = subprocess.run(cmd, env=ray_head.env, cwd=ROOT, capture_output=True, text=True, timeout=380)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout.splitlines()[-1]
    assert "| ResMem |" in out.stdout and "[train] epoch 1/1" in out.stdout  # the job's streamed logs
    # everything is in the bucket: the manifest, each stage's outputs, Ray Train's checkpoint
    files = s3.list("runs/digits")
    assert {"manifest.json", "model/model.pt", "index/manifest.json", "report/metrics.json"} <= set(files)
    assert any(f.startswith("embeddings/test/") and f.endswith(".parquet") for f in files)
    assert any(f.startswith("ray_train/checkpoint_") for f in files)
    manifest = json.loads(s3.read("runs/digits/manifest.json"))
    assert [manifest["stages"][s]["status"] for s in STAGES] == ["done"] * 4
    metrics = json.loads(s3.read("runs/digits/report/metrics.json"))
    assert metrics["accuracy"]["base"] > 0.3 and metrics["num_test"] == 449

    # The same command from another machine's view (an empty mirror) with a new k: it pulls
    # the run from S3, train, embed and index outputs match the manifest and are skipped; k
    # changes evaluate's inputs only: evaluate reruns and its report reaches S3
    env = driver_env(ray_head, tmp_path / "cache")
    again = subprocess.run([RESMEM, *args, "resmem.k=7"], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"== {s}: finished, outputs match the manifest: skipped ==" in again.stdout for s in STAGES[:3])
    assert "| ResMem |" in again.stdout
    skipped = [s for s in STAGES if f"== {s}: finished" in again.stdout]
    assert skipped == ["train", "embed", "index"] and "== evaluate done" in again.stdout
    assert "k=7," in s3.read("runs/digits/report/report.md").decode()


def test_submit_with_a_wrong_token_is_refused(ray_head, tmp_path):
    env = {**ray_head.env, "RAY_AUTH_TOKEN": "0" * 64}
    cmd = [RESMEM, "submit", "--address", ray_head.dashboard, "--working-dir", str(ROOT),
           "train", "--config", "jobs/configs/digits.yaml", f"run_dir={tmp_path}"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("resmem: error: could not submit") and "uthentication" in out.stderr


@pytest.mark.timeout(300)
def test_killed_driver_resumes_from_last_checkpoint(ray_head, s3, tmp_path):
    epochs = 6  # the kill lands after the first snapshot: epochs to spare (a checkpoint per epoch)
    cmd = [RESMEM, "train", "--config", "jobs/configs/digits.yaml", f"train.epochs={epochs}", *FAST,
           f"run_dir={s3.uri('runs/resume')}"]
    env = driver_env(ray_head, tmp_path / "cache")
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            # Ray Train's controller lists each reported checkpoint in its snapshot (in S3);
            # a rerun resumes from the latest one listed there.
            while driver.poll() is None and not _latest_epoch(s3):
                time.sleep(0.1)
            assert driver.poll() is None, "training finished before it could be interrupted"
            driver.send_signal(signal.SIGKILL)
        finally:
            driver.kill()
            driver.wait()
    saved = _latest_epoch(s3)
    assert 1 <= saved < epochs
    assert json.loads(s3.read("runs/resume/manifest.json"))["stages"]["train"]["status"] == "running"

    rerun = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    resumed = [int(line.split("resuming after epoch ")[1].split()[0])
               for line in rerun.stdout.splitlines() if "resuming after epoch" in line]
    assert resumed and resumed[0] >= saved, rerun.stdout[-3000:]
    assert f"[train] epoch 1/{epochs} " not in rerun.stdout and f"[train] epoch {epochs}/{epochs} " in rerun.stdout
    history = json.loads(s3.read("runs/resume/model/history.json"))
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert json.loads(s3.read("runs/resume/manifest.json"))["stages"]["train"]["status"] == "done"


def _latest_epoch(s3: MotoS3) -> int:
    try:
        latest = json.loads(s3.read("runs/resume/ray_train/checkpoint_manager_snapshot.json"))
    except (OSError, json.JSONDecodeError):  # not written yet
        return 0
    result = latest.get("latest_checkpoint_result")
    return result["metrics"]["epoch"] if result else 0
