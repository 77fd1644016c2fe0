"""`resmem index` builds each shard where its rows are: the driver reads parquet metadata,
never the split, and the shards equal the ones built from the whole split in memory. A
precomputed split's train and embed hold it a chunk at a time."""

import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resmem_ray.cli import main
from resmem_ray.config import load_config
from resmem_ray.runtime.shards import write_shards
from resmem_ray.store.artifacts import load_shard, plan_shards, read_index_manifest, read_split, row_groups
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.registry import task_for

from .test_precomputed import write_parquet

CLASSES, DIM, TRAIN = 10, 48, 45_000
SHARDS = 3


def mixture(rng, n: int) -> dict:
    means = rng.normal(0, 1, (CLASSES, DIM))
    y = rng.integers(0, CLASSES, n)
    return {"embedding": (means[y] + rng.normal(0, 0.8, (n, DIM))).astype(np.float32),
            "logits": rng.normal(0, 1, (n, CLASSES)).astype(np.float32), "label": y}


class RowsRead:
    """Counts the rows pyarrow's parquet readers hand to this process."""

    def __init__(self, monkeypatch):
        self.rows = self.largest = 0  # all rows, and the most in one call
        for name in ("read", "read_row_group", "read_row_groups"):
            self._count(monkeypatch, name, lambda t: t.num_rows)
        real_iter = pq.ParquetFile.iter_batches

        def iter_batches(f, *a, **kw):
            for batch in real_iter(f, *a, **kw):
                self._add(batch.num_rows)
                yield batch
        monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
        real_table = pq.read_table

        def read_table(*a, **kw):
            table = real_table(*a, **kw)
            self._add(table.num_rows)
            return table
        monkeypatch.setattr(pq, "read_table", read_table)

    def _add(self, rows: int) -> None:
        self.rows, self.largest = self.rows + rows, max(self.largest, rows)

    def _count(self, monkeypatch, name, rows):
        real = getattr(pq.ParquetFile, name)

        def counted(f, *a, **kw):
            out = real(f, *a, **kw)
            self._add(rows(out))
            return out
        monkeypatch.setattr(pq.ParquetFile, name, counted)


@pytest.mark.timeout(300)
def test_the_driver_never_holds_the_split_and_the_shards_are_todays(ray_session, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    source = write_parquet(tmp_path / "rows", {"train": mixture(rng, TRAIN), "val": mixture(rng, 50),
                                               "test": mixture(rng, 50)})
    run_dir = tmp_path / "run"
    args = ["--config", "jobs/configs/precomputed.yaml", f"run_dir={run_dir}", f"model.path={source}",
            f"index.num_shards={SHARDS}", "index.factory=Flat", "embed.batch_size=4096", "resmem.temperature=2.0"]
    assert main(["train", *args]) == 0 and main(["embed", *args]) == 0
    run = RunDir(run_dir)
    split_bytes = sum(p.stat().st_size for p in (run.embeddings / "train").glob("*.parquet"))
    assert split_bytes > 10e6

    assert main(["index", *args]) == 0  # once before measuring: the modules it imports are not the split
    reads = RowsRead(monkeypatch)
    tracemalloc.start()
    try:
        assert main(["index", *args]) == 0
        _, peak = tracemalloc.get_traced_memory()  # numpy arrays and Python objects of this process
    finally:
        tracemalloc.stop()
    monkeypatch.undo()
    assert reads.rows <= 1  # the first row: the task's checks and the memory's dim
    assert peak < split_bytes / 3, f"the driver held {peak / 2**20:.1f} MiB while indexing {split_bytes / 2**20:.1f} MiB"

    # today's in-driver build over the same rows: the same shards, byte for byte
    cfg = load_config("jobs/configs/precomputed.yaml", tuple(args[2:]))
    task = task_for(cfg)
    rows = read_split(run, "train", "test", task.memory_columns)
    residuals = task.memory_rows(cfg, rows, 2.0, run.stage_output("embed", "test"))["residuals"]
    from resmem_ray.core.knn import prepare_queries
    emb = prepare_queries(rows["embedding"], cfg.resmem.distance, cfg.resmem.normalize)
    (tmp_path / "today").mkdir()
    today = write_shards(tmp_path / "today", emb, rows["id"], rows["label"], residuals, cfg.index,
                         cfg.resmem.distance, cfg.resmem.normalize, 2.0)
    built = read_index_manifest(run, "test")
    assert {k: v for k, v in built.items() if k in today and k != "shards"} == \
        {k: v for k, v in today.items() if k != "shards"}
    for ours, theirs in zip(built["shards"], today["shards"], strict=True):
        assert ours["rows"] == theirs["rows"] and ours["files"][f"shard-{ours['shard']:05d}.faiss"] == \
            theirs["files"][f"shard-{theirs['shard']:05d}.faiss"]  # the same vectors in the same order
        (_, a), (_, b) = load_shard(run.index, ours), load_shard(tmp_path / "today", theirs)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_plan_follows_ids_when_row_groups_do_not_overlap():
    def group(file, rows, ids):
        return {"file": file, "sha256": "", "group": 0, "rows": rows, "ids": ids}

    # files listed out of id order: the plan is in id order, a group's rows ranked by id
    plan = plan_shards([group("b", 4, [4, 7]), group("a", 4, [0, 3])], 2)
    assert [[(p["file"], p["start"], p["stop"], p["by_id"]) for p in s] for s in plan] == \
        [[("a", 0, 4, True)], [("b", 0, 4, True)]]
    plan = plan_shards([group("b", 4, [4, 7]), group("a", 4, [0, 3])], 3)
    assert [[(p["file"], p["start"], p["stop"]) for p in s] for s in plan] == \
        [[("a", 0, 2)], [("a", 2, 4), ("b", 0, 1)], [("b", 1, 4)]]
    # overlapping ranges (or none recorded): file order, the same rows in all
    for second in ([2, 9], None):
        plan = plan_shards([group("b", 4, [4, 7]), group("a", 4, second)], 2)
        assert [[(p["file"], p["start"], p["stop"], p["by_id"]) for p in s] for s in plan] == \
            [[("b", 0, 4, False)], [("a", 0, 4, False)]]


def test_a_task_on_a_host_without_the_run_reads_its_rows_from_the_uri(tmp_path, monkeypatch):
    from resmem_ray.errors import ResMemError
    from resmem_ray.store.artifacts import read_pieces, row_groups
    from resmem_ray.store.files import sha256

    run, rel = tmp_path / "run", "embeddings/train/part.parquet"
    (run / "embeddings" / "train").mkdir(parents=True)
    ids = np.array([5, 3, 4, 0, 2, 1])
    emb = np.arange(12, dtype=np.float32).reshape(6, 2)
    pq.write_table(pa.table({"id": ids, "label": ids % 2, "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(emb.ravel()), 2)}), run / rel, row_group_size=3)
    groups = row_groups(run, rel, sha256(run / rel), ("id", "label", "embedding"))
    assert [(g["rows"], g["ids"]) for g in groups] == [(3, [3, 5]), (3, [0, 2])]
    [first, second] = plan_shards(groups, 2)  # groups in id order, each ranked by id
    monkeypatch.setenv("RESMEM_CACHE", str(tmp_path / "cache"))
    elsewhere = tmp_path / "not-here"  # the driver's path, which this host lacks
    rows = read_pieces(elsewhere, second, ("id", "embedding"), run_uri=f"file://{run}")
    np.testing.assert_array_equal(rows["id"], [3, 4, 5])
    stale = tmp_path / "stale"  # the driver's path names an old copy on this host (an earlier embed)
    (stale / "embeddings" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"id": ids + 100, "label": ids % 2, "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(emb.ravel()), 2)}), stale / rel, row_group_size=3)
    assert read_pieces(stale, second, ("id",), run_uri=f"file://{run}")["id"].tolist() == [3, 4, 5]
    np.testing.assert_array_equal(rows["embedding"], emb[[1, 2, 0]])
    assert read_pieces(run, first, ("id",))["id"].tolist() == [0, 1, 2]
    with pytest.raises(ResMemError, match="is not on this host: a run directory on local disk"):
        read_pieces(elsewhere, first, ("id",))
    (run / rel).write_bytes(b"changed")
    for p in (tmp_path / "cache").rglob("*.parquet"):
        p.unlink()
    with pytest.raises(ResMemError, match=f"{rel} does not match its manifest hash"):
        read_pieces(elsewhere, first, ("id",), run_uri=f"file://{run}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["parquet", "npy"])
def test_precomputed_train_and_embed_hold_a_chunk_at_a_time(ray_session, tmp_path, monkeypatch, layout):
    """train's checks and embed's copy read the split a bounded chunk at a time: with the
    bound set to a few thousand rows, a split ~40 times larger is never held whole."""
    from resmem_ray.tasks import precomputed

    from .test_precomputed import write_npy

    rng = np.random.default_rng(1)
    n = 2 * TRAIN
    splits = {"train": mixture(rng, n), "val": mixture(rng, 50), "test": mixture(rng, 50)}
    write = write_parquet if layout == "parquet" else write_npy
    source = write(tmp_path / "rows", splits)
    small = write(tmp_path / "small", {name: mixture(rng, 50) for name in splits})
    for stage in ("train", "embed"):  # once before measuring: the modules a first run imports are no rows
        assert main([stage, "--config", "jobs/configs/precomputed.yaml", f"run_dir={tmp_path / 'warm'}",
                     f"model.path={small}"]) == 0
    chunk = 2048
    monkeypatch.setattr(precomputed, "CHUNK", chunk)
    monkeypatch.setattr(precomputed, "BLOCK_BYTES", chunk * 4 * (DIM + CLASSES), raising=False)
    split_bytes = n * 4 * (DIM + CLASSES)
    run_dir = tmp_path / "run"
    args = ["--config", "jobs/configs/precomputed.yaml", f"run_dir={run_dir}", f"model.path={source}"]
    for stage in ("train", "embed"):
        reads = RowsRead(monkeypatch)
        tracemalloc.start()
        try:
            assert main([stage, *args]) == 0
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert reads.largest <= chunk, f"{stage}: pyarrow handed the driver {reads.largest} rows at once"
        assert peak < split_bytes / 5, \
            f"{stage}: the driver held {peak / 2**20:.1f} MiB of a {split_bytes / 2**20:.1f} MiB split"
    monkeypatch.undo()
    rows = read_split(RunDir(run_dir), "train", "test")
    np.testing.assert_array_equal(rows["id"], np.arange(n))
    np.testing.assert_array_equal(rows["embedding"], splits["train"]["embedding"])
    np.testing.assert_array_equal(rows["logits"], splits["train"]["logits"])
    groups = [g for p in sorted((run_dir / "embeddings" / "train").glob("*.parquet"))
              for g in row_groups(run_dir, str(p.relative_to(run_dir)), "", ("id",))]
    assert len(groups) == -(-n // chunk) and all(g["rows"] <= chunk for g in groups)
    assert [g["ids"] for g in groups] == [[a, min(a + chunk, n) - 1] for a in range(0, n, chunk)]


def first_shard_fails(rows: dict) -> dict:
    """A task's memory rows: the shard holding id 0 is refused, the others take a minute."""
    import time

    from resmem_ray.errors import ResMemError

    if rows["id"][0] == 0:
        raise ResMemError("shard 0: refused")
    time.sleep(60)
    raise AssertionError("not cancelled")


@pytest.mark.timeout(60)
def test_a_failed_shard_task_cancels_the_others(ray_session, tmp_path):
    import time

    from resmem_ray.config import IndexConfig
    from resmem_ray.errors import ResMemError
    from resmem_ray.runtime.shards import build_planned_shards

    n = 300
    pq.write_table(pa.table({"id": np.arange(n), "label": np.zeros(n, np.int64),
                             "embedding": pa.FixedSizeListArray.from_arrays(np.zeros(n * 4, np.float32), 4)}),
                   tmp_path / "train.parquet", row_group_size=100)
    groups = row_groups(tmp_path, "train.parquet", "", ("id", "label", "embedding"))
    (tmp_path / "index").mkdir()
    free = ray_session.available_resources().get("CPU", 0)  # another test's actors may still be going away
    t0 = time.time()
    with pytest.raises(ResMemError, match="shard 0: refused"):
        build_planned_shards(tmp_path / "index", tmp_path, None, plan_shards(groups, 3), ("id", "label", "embedding"),
                             first_shard_fails, 4, 10, IndexConfig(num_shards=3), "l2", False, 1.0)
    while ray_session.available_resources().get("CPU", 0) < free and time.time() - t0 < 20:
        time.sleep(0.2)  # the cancelled tasks give their CPUs back
    assert ray_session.available_resources().get("CPU", 0) >= free
