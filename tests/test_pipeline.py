"""Every stage through the CLI on tiny real data, with a shared local Ray instance."""

import json
import runpy
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from resmem_ray.cli import main
from resmem_ray.config import load_config
from resmem_ray.tasks.image_data import load_splits
from resmem_ray.store.artifacts import read_split
from resmem_ray.core.resmem import residuals
from resmem_ray.store.rundir import RunDir
from resmem_ray.store.files import file_hashes
from resmem_ray.stage_table import STAGES
from resmem_ray.submit import JOB_STAGES
from resmem_ray.tasks.methods import neighbour_baselines

from .conftest import DIGITS_ARGS
from .test_data import write_imagefolder

METHODS = {"base", "knn_1", "knn_10", "knn_20", "knn_30", *(m.key for m in neighbour_baselines()), "resmem", "oracle_gate"}


def test_run_writes_report_and_artifacts(digits_run):
    run = RunDir(digits_run)
    manifest = run.manifest()
    ran = [s.name for s in STAGES.values() if s.in_pipeline and s.enabled_by is None]  # every run runs these
    assert [manifest["stages"][s]["status"] for s in ran] == ["done"] * 4
    assert manifest["versions"]["ray"].startswith("2.")
    assert len(json.loads((run.model / "history.json").read_text())) == 3

    cfg = load_config("jobs/configs/digits.yaml")
    splits, _ = load_splits(cfg.data, cfg.seed)
    for name in ("train", "val", "test"):
        table = read_split(run, name, "test")
        np.testing.assert_array_equal(table["id"], splits[name].ids)
        np.testing.assert_array_equal(table["label"], splits[name].labels)
        assert table["embedding"].shape == (len(splits[name]), 16)
        assert "residual" not in pq.read_schema(next((run.embeddings / name).glob("*.parquet"))).names
    # residuals live in the memory only: computed by index from the logits at resmem.temperature
    train = read_split(run, "train", "test")
    shards = [np.load(p) for p in sorted(run.index.glob("shard-*.npz"))]
    ids = np.concatenate([z["ids"] for z in shards])
    rows = np.concatenate([z["residuals"] for z in shards])[np.argsort(ids)]
    np.testing.assert_allclose(rows, residuals(train["logits"], train["label"], cfg.resmem.temperature), atol=1e-6)

    metrics = json.loads((run.report / "metrics.json").read_text())
    acc = metrics["accuracy"]
    assert set(acc) == METHODS
    assert acc["base"] > 0.5 and acc["knn_1"] > 0.5  # 3 epochs: far above chance (0.1)
    assert acc["oracle_gate"] >= max(acc["base"], acc["knn_1"])
    report = (run.report / "report.md").read_text()
    assert "| ResMem |" in report and "| 30-NN |" in report and "| oracle gate" in report
    assert "449 examples (one example is 0.22 points)" in report
    # the kNN interpolation baseline: its own row, after the k-NN rows and before ResMem
    assert report.index("| 30-NN |") < report.index("| kNN interpolation |") < report.index("| ResMem |")
    assert metrics["knn_interp"] == {"lambda": cfg.resmem.knn_lambda, "tau": cfg.resmem.knn_tau,
                                     "k": cfg.resmem.k, "chosen_by": "config"}
    assert acc["knn_interp"] > 0.5
    assert metrics["warnings"] == [] and "Warning" not in report  # 3 epochs learned: no warning
    preds = pq.read_table(run.report / "predictions.parquet").to_pydict()
    assert preds["id"] == splits["test"].ids.tolist()
    for m in METHODS:
        assert np.mean(np.array(preds[m]) == np.array(preds["label"])) == pytest.approx(acc[m])
    assert (run.report / "accuracy_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(run.root.glob(".*.tmp"))


def evaluate_with_shards(run_dir, shards, index=(), evaluate=()):
    """The predictions of the memory indexed in `shards` shards with the `index` overrides,
    evaluated with the `evaluate` overrides added."""
    args = [*DIGITS_ARGS, f"run_dir={run_dir}", f"index.num_shards={shards}", *index]
    assert main(["index", *args]) == 0
    assert main(["evaluate", *args, *evaluate]) == 0
    index = json.loads((run_dir / "index" / "manifest.json").read_text())
    assert len(index["shards"]) == shards and sum(s["rows"] for s in index["shards"]) == index["rows"]
    return pq.read_table(run_dir / "report" / "predictions.parquet").to_pydict()


def test_one_and_three_shards_give_identical_predictions(run_copy, digits_run):
    """The three shards compressed (4-bit scalar-quantized IVF codes, the full-precision
    vectors kept on disk) and every row re-ranked exactly; the test split streamed in
    chunks of ~10 KB (6 chunks, a row group of predictions each): the same predictions
    and metrics as exact shards and the whole split at once."""
    two = pq.read_table(digits_run / "report" / "predictions.parquet").to_pydict()
    one = evaluate_with_shards(run_copy, 1)
    three = evaluate_with_shards(run_copy, 3, index=("index.factory=IVF4,SQ4", "index.keep_vectors=true", "index.nprobe=4"),
                                 evaluate=("evaluate.chunk_mb=0.01", "index.rerank=1000"))
    assert one == three == two
    assert pq.ParquetFile(run_copy / "report" / "predictions.parquet").metadata.num_row_groups > 3
    whole, chunked = (json.loads((r / "report" / "metrics.json").read_text()) for r in (digits_run, run_copy))
    assert chunked["accuracy"] == whole["accuracy"] and chunked["per_class"] == whole["per_class"]
    assert chunked["vs_base"] == whole["vs_base"]
    assert "bytes per row on disk (index" in (run_copy / "report" / "report.md").read_text()
    assert chunked["memory_footprint"].count("vectors") == 1


def cli(*args):
    """The installed console script, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "resmem_ray.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("override,message", [
    ("trian.epochs=3", "unknown config key trian"),
    ("data.name=mnist", "config key data.name: unknown value 'mnist'"),
    ("model.name=resnet99", "config key model.name: unknown value 'resnet99'"),
])
def test_bad_config_exits_with_one_line(tmp_path, override, message):
    out = cli("run", "--config", "jobs/configs/digits.yaml", f"run_dir={tmp_path / 'r'}", override)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"resmem: error: {out.stderr.strip()[15:]}"]
    assert message in out.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("stage", JOB_STAGES)
def test_job_entry_points(stage, monkeypatch, capsys):
    """`ray job submit -- python -m jobs STAGE ...` runs each stage (the module run as
    `python -m jobs` runs it, in this process)."""
    monkeypatch.setattr(sys, "argv", ["jobs", stage, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("jobs", run_name="__main__", alter_sys=True)
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and f"usage: resmem {stage}" in out and "--config" in out


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resmem: error: ")
    return lines[0]


@pytest.mark.parametrize("stage,missing", [("embed", "train"), ("index", "embed"), ("evaluate", "index")])
def test_missing_stage_inputs(ray_session, tmp_path, capsys, stage, missing):
    run_dir = tmp_path / "empty"
    assert main([stage, *DIGITS_ARGS, f"run_dir={run_dir}"]) == 2
    assert f"has no finished '{missing}' stage, which '{stage}' needs" in one_error_line(capsys)
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_k_larger_than_memory_leaves_report_untouched(run_copy, capsys):
    before = file_hashes(run_copy)
    assert main(["evaluate", *DIGITS_ARGS, f"run_dir={run_copy}", "resmem.k=100000"]) == 2
    expected = ("k=100000 (max of resmem.k, resmem.knn_k, evaluate.knn_ks and neighbour_transformer.k) is larger "
                "than the memory")
    assert expected in one_error_line(capsys)
    assert file_hashes(run_copy) == before


def test_query_time_settings_must_match_index(run_copy, capsys):
    assert main(["evaluate", *DIGITS_ARGS, f"run_dir={run_copy}", "resmem.distance=cosine"]) == 2
    assert "resmem.distance='cosine' differs from the index's 'l2'" in one_error_line(capsys)


def test_corrupt_index_shard_is_detected(run_copy, capsys):
    shard = run_copy / "index" / "shard-00001.npz"
    original = shard.read_bytes()
    shard.write_bytes(original[:-10])  # truncated
    assert main(["evaluate", *DIGITS_ARGS, f"run_dir={run_copy}"]) == 2
    assert f"shard-00001.npz has {len(original) - 10} bytes, the manifest says {len(original)}" \
        in one_error_line(capsys)
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit flipped
    assert main(["evaluate", *DIGITS_ARGS, f"run_dir={run_copy}"]) == 2
    assert "shard-00001.npz does not match its manifest hash" in one_error_line(capsys)


@pytest.fixture(scope="module")
def imagefolder_run(ray_session, tmp_path_factory):
    """The ImageNet layout (PNG files): decoding runs as its own Ray Data step."""
    root = tmp_path_factory.mktemp("imagefolder")
    write_imagefolder(root / "data", per_class=(12, 4), size=20)
    run_dir = root / "run"
    args = ["--config", "jobs/configs/digits.yaml", f"run_dir={run_dir}", "data.name=imagefolder",
            f"data.root={root / 'data'}", "data.image_size=16", "data.val_fraction=0.2",
            "model.width=2", "train.epochs=2", "train.num_workers=1", "resmem.k=5",
            "evaluate.knn_ks=[1,5]", "index.num_shards=2", "neighbour_transformer.enabled=false"]
    assert main(["run", *args]) == 0
    return run_dir


def test_imagefolder_pipeline(imagefolder_run):
    metrics = json.loads((imagefolder_run / "report" / "metrics.json").read_text())
    assert metrics["num_test"] == 12 and metrics["memory_rows"] == 29
    # three well-separated colour classes: the memory alone finds them
    assert metrics["accuracy"]["knn_1"] == 1.0


def test_embedding_dim_mismatch(run_copy, imagefolder_run, capsys):
    import shutil

    shutil.rmtree(run_copy / "index")
    shutil.copytree(imagefolder_run / "index", run_copy / "index")  # an 8-dim index
    RunDir(run_copy).update_outputs("index")  # vouched for by the manifest: the hash checks pass
    assert main(["evaluate", *DIGITS_ARGS, f"run_dir={run_copy}", "resmem.k=5"]) == 2
    line = one_error_line(capsys)
    assert "embedding dimension 16 of" in line and "does not match the index" in line and "(8 dims)" in line
