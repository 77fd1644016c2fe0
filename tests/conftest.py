"""One local Ray instance for the whole test session (ray.init costs ~8 s here), and one
small digits pipeline run that several tests read. Tests that start Ray carry the `ray`
marker (`make test-fast` runs the others, and fails any of them that starts Ray)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# `resmem serve`'s default (serve.direct_ingress): Serve's throughput-optimised mode, read
# when the session's Ray instance starts
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")  # as `resmem serve` (cli.py)
# Ray Train's controller polls its workers every 2 s and starts a preemption watcher (one
# more actor process): together ~4.5 s of every TorchTrainer run on a 2-core machine.
# The tests train a few epochs on tiny data and are never preempted; subprocesses inherit both.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# Tiny but real: 2 Ray Train workers, 2 Ray Data actors, 2 FAISS shard actors.
DIGITS_ARGS = ["--config", "jobs/configs/digits.yaml", "train.epochs=3", "train.cpus_per_worker=0.5",
               "neighbour_transformer.enabled=false"]


@pytest.fixture(scope="session")
def digits_run(ray_session, tmp_path_factory):
    """A finished digits pipeline; tests that change it work on a copy (`run_copy`)."""
    from resmem_ray.cli import main

    run_dir = tmp_path_factory.mktemp("digits") / "run"
    assert main(["run", *DIGITS_ARGS, f"run_dir={run_dir}"]) == 0
    return run_dir


@pytest.fixture
def run_copy(digits_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(digits_run, dst)
    return dst


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback (tests/ray_head.py), one per test module."""
    from .ray_head import MotoS3

    server = MotoS3()
    try:
        yield server
    finally:
        server.stop()


# A test whose fixtures include one of these starts Ray (directly or through digits_run,
# run_copy and the module fixtures built on them); the others that do are marked by hand.
RAY_FIXTURES = {"ray_session", "ray_head"}
RAY_GUARD = pytest.StashKey[Path]()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


def pytest_collection_finish(session):
    """A session without `ray` tests gives Ray a folder of its own (RAY_TMPDIR, inherited
    by subprocesses): a test that starts Ray anyway leaves a session folder there."""
    if session.items and not any(item.get_closest_marker("ray") for item in session.items):
        guard = Path(tempfile.mkdtemp(prefix="rfast-", dir="/tmp"))  # short: Ray's socket paths
        session.config.stash[RAY_GUARD] = guard
        os.environ["RAY_TMPDIR"] = str(guard)


def pytest_sessionfinish(session):
    if RAY_GUARD in session.config.stash:
        shutil.rmtree(session.config.stash[RAY_GUARD], ignore_errors=True)


@pytest.fixture(autouse=True)
def no_ray_started(request):
    """Fails a test of a session without `ray` tests that started Ray."""
    yield
    guard = request.config.stash.get(RAY_GUARD, None)
    if guard is None or not any(guard.glob("ray/session_*")):
        return
    import ray

    ray.shutdown()
    shutil.rmtree(guard / "ray", ignore_errors=True)
    pytest.fail("this test starts Ray: mark it @pytest.mark.ray (tests/conftest.py)", pytrace=False)
