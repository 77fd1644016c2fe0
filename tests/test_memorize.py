"""`resmem memorize`: added examples enter the memory and their predictions follow."""

import json

import numpy as np
import pyarrow.parquet as pq

from resmem_ray.cli import main
from resmem_ray.config import load_config
from resmem_ray.tasks.image_data import load_splits

from .conftest import DIGITS_ARGS
from .test_pipeline import one_error_line


def test_memorized_examples_follow_their_new_labels(run_copy, tmp_path, capsys):
    cfg = load_config("jobs/configs/digits.yaml")
    test = load_splits(cfg.data, cfg.seed)[0]["test"]
    pick = np.arange(0, 300, 10)  # 30 test images, relabelled
    new_labels = (test.labels[pick] + 1) % 10
    path = tmp_path / "new.npz"
    np.savez(path, images=test.images[pick], labels=new_labels)
    args = [*DIGITS_ARGS, f"run_dir={run_copy}"]

    before = json.loads((run_copy / "index" / "manifest.json").read_text())
    assert main(["memorize", *args, "--examples", str(path)]) == 0
    after = json.loads((run_copy / "index" / "manifest.json").read_text())
    assert after["rows"] == before["rows"] + 30 and len(after["shards"]) == len(before["shards"]) + 1
    assert after["memorized"][0]["rows"] == 30 and after["next_id"] == before["next_id"] + 30

    # a narrow kernel: the memorized copy (distance 0) outweighs the training neighbours,
    # whose residuals still point to the original label
    capsys.readouterr()
    assert main(["evaluate", *args, "resmem.sigma=0.01"]) == 0
    n = len(after["shards"])
    assert f"{n} shards in {n - 1} actor(s)" in capsys.readouterr().out  # the added shard joins the last actor
    preds = pq.read_table(run_copy / "report" / "predictions.parquet").to_pandas().set_index("id")
    followed = preds.loc[test.ids[pick], "resmem"].to_numpy() == new_labels
    assert followed.mean() >= 0.9  # the example itself is its own nearest neighbour
    base = preds.loc[test.ids[pick], "base"].to_numpy() == new_labels
    assert base.mean() <= 0.2  # the model alone mostly disagrees with the new labels

    # what the neighbour Transformer and tune read as the memory: the train split and these rows
    from resmem_ray.store.artifacts import read_memory_split, read_split
    from resmem_ray.store.rundir import RunDir

    memory = read_memory_split(RunDir(run_copy), "evaluate", ("id", "label", "embedding"))
    train = read_split(RunDir(run_copy), "train", "evaluate", ("id",))
    assert len(memory["id"]) == len(train["id"]) + len(pick) and (np.diff(memory["id"]) > 0).all()
    assert memory["label"][-len(pick):].tolist() == new_labels.tolist()

    # `resmem index` with another shard count keeps the memorized rows: same answers
    manifest_path = run_copy / "index" / "manifest.json"
    capsys.readouterr()
    assert main(["index", *args, "index.num_shards=3"]) == 0
    assert f"({len(pick)} of them memorized)" in capsys.readouterr().out
    rebuilt = json.loads(manifest_path.read_text())
    assert rebuilt["rows"] == after["rows"] and len(rebuilt["shards"]) == 3
    assert rebuilt["next_id"] == after["next_id"] and rebuilt["memorized"][0]["file"].startswith("memorized/")
    assert main(["evaluate", *args, "resmem.sigma=0.01", "index.num_shards=3"]) == 0
    again = pq.read_table(run_copy / "report" / "predictions.parquet").to_pandas().set_index("id")
    assert again["resmem"].tolist() == preds["resmem"].tolist()
    assert again["nn1_id"].tolist() == preds["nn1_id"].tolist()

    # rows embedded by another model (a retrained one) are dropped, and the log says so
    rebuilt["memorized"][0]["model"] = "an earlier model"
    manifest_path.write_text(json.dumps(rebuilt))
    assert main(["index", *args]) == 0
    assert f"dropped {len(pick)} memorized rows" in capsys.readouterr().out
    assert json.loads(manifest_path.read_text())["rows"] == before["rows"]


def test_memorize_rejects_bad_examples(run_copy, tmp_path, capsys):
    args = [*DIGITS_ARGS, f"run_dir={run_copy}"]
    index_before = (run_copy / "index" / "manifest.json").read_text()
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((3, 1, 28, 28), np.uint8), labels=np.zeros(3, np.int64))
    assert main(["memorize", *args, "--examples", str(wrong)]) == 2
    assert "images are uint8 (3, 1, 28, 28), the model takes uint8 (N, 1, 8, 8)" in one_error_line(capsys)
    labels = tmp_path / "labels.npz"
    np.savez(labels, images=np.zeros((2, 1, 8, 8), np.uint8), labels=np.array([3, 12]))
    assert main(["memorize", *args, "--examples", str(labels)]) == 2
    assert "labels must lie in [0, 10), got 3..12" in one_error_line(capsys)
    garbage = tmp_path / "garbage.npz"
    garbage.write_text("not a zip")
    assert main(["memorize", *args, "--examples", str(garbage)]) == 2
    assert "not a readable .npz file" in one_error_line(capsys)
    assert (run_copy / "index" / "manifest.json").read_text() == index_before

