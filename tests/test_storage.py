"""s3:// run directories through pyarrow.fs, against moto's S3 server on loopback."""

import json

import pytest

from resmem_ray.errors import ResMemError
from resmem_ray.store.rundir import RunDir
from resmem_ray.store.remote import is_uri

from .ray_head import MotoS3


@pytest.fixture
def creds(monkeypatch, tmp_path):
    for k, v in MotoS3.CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RESMEM_CACHE", str(tmp_path / "cache-a"))


def test_is_uri():
    assert is_uri("s3://b/x") and is_uri("gs://b/x") and is_uri("file:///tmp/x")
    assert not is_uri("runs/digits") and not is_uri("/abs/path") and not is_uri("C:\\runs")


def test_stage_outputs_round_trip_through_s3(s3, creds, monkeypatch, tmp_path):
    uri = s3.uri("unit/run")
    run = RunDir(uri)
    assert run.location == uri and run.root.is_dir()
    run.mark_running("embed", {"seed": 0})
    assert json.loads(s3.read("unit/run/manifest.json"))["stages"]["embed"]["status"] == "running"
    (run.embeddings / "train").mkdir(parents=True)
    (run.embeddings / "train" / "a.parquet").write_bytes(b"first")
    run.mark_done("embed", {"seed": 0})
    assert s3.list("unit/run") == ["embeddings/train/a.parquet", "manifest.json"]

    # a rerun's outputs replace the remote folder: no stale file of the earlier run stays
    (run.embeddings / "train" / "a.parquet").unlink()
    (run.embeddings / "train" / "b.parquet").write_bytes(b"second")
    run.mark_running("embed", {"seed": 0})
    run.mark_done("embed", {"seed": 0})
    assert s3.list("unit/run") == ["embeddings/train/b.parquet", "manifest.json"]

    # another machine (an empty mirror) pulls exactly what the manifest vouches for
    monkeypatch.setenv("RESMEM_CACHE", str(tmp_path / "cache-b"))
    other = RunDir(uri)
    assert other.root != run.root
    assert (other.embeddings / "train" / "b.parquet").read_bytes() == b"second"
    assert other.stale_reason("embed", {"seed": 0}) is None
    assert other.stale_reason("embed", {"seed": 1}) == "config changed"
    (other.embeddings / "train" / "b.parquet").write_bytes(b"corrupt")
    assert "does not match the manifest" in other.stale_reason("embed", {"seed": 0})


def test_missing_vouched_file_is_named(s3, creds, monkeypatch, tmp_path):
    uri = s3.uri("unit/broken")
    run = RunDir(uri)
    run.mark_running("train", {})
    run.model.mkdir()
    (run.model / "model.pt").write_bytes(b"w")
    run.mark_done("train", {})
    s3.fs.delete_file(f"{s3.bucket}/unit/broken/model/model.pt")
    monkeypatch.setenv("RESMEM_CACHE", str(tmp_path / "cache-c"))
    with pytest.raises(ResMemError, match="model/model.pt is missing"):
        RunDir(uri)


def test_unreachable_store_is_one_clear_error(creds):
    with pytest.raises(ResMemError, match="run_dir='nope://x'"):
        RunDir("nope://x")
