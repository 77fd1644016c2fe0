"""One local Ray instance for the whole test session (ray.init costs ~8 s here), and one
small digits pipeline run that several tests read."""

import os
import shutil

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# `resmem serve`'s default (serve.direct_ingress): Serve's throughput-optimised mode, read
# when the session's Ray instance starts
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")  # as `resmem serve` (cli.py)


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
