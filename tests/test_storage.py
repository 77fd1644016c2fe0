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


def test_a_disk_table_is_written_by_chunks_and_read_memory_mapped(tmp_path):
    import numpy as np

    from resmem_ray.errors import ResMemError
    from resmem_ray.store.artifacts import DiskTable, open_disk_table

    rng = np.random.default_rng(0)
    whole = {"val": {"label": rng.integers(0, 9, 10), "logits": rng.normal(size=(10, 3)).astype(np.float32)},
             "residuals_at": {1.0: rng.normal(size=(10, 4, 3)), 4.0: rng.normal(size=(10, 4, 3))},
             "skipped": None}
    table = DiskTable(tmp_path / "t", 10)
    for a, b in ((0, 4), (4, 10)):
        table.append({"val": {c: v[a:b] for c, v in whole["val"].items()},
                      "residuals_at": {t: v[a:b] for t, v in whole["residuals_at"].items()}, "skipped": None})
    opened = table.close()
    assert set(opened) == {"val", "residuals_at"} and set(opened["residuals_at"]) == {1.0, 4.0}
    assert isinstance(opened["val"]["logits"], np.memmap) and opened["val"]["logits"].dtype == np.float32
    for t in (1.0, 4.0):
        np.testing.assert_array_equal(opened["residuals_at"][t], whole["residuals_at"][t])
    np.testing.assert_array_equal(open_disk_table(tmp_path / "t")["val"]["label"], whole["val"]["label"])
    short = DiskTable(tmp_path / "short", 10)
    short.append({"x": np.zeros(3)})
    with pytest.raises(ResMemError, match="3 rows written, 10 expected"):
        short.close()
