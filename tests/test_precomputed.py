"""model.source=precomputed: ResMem over embeddings and logits written elsewhere, checked
against a brute-force ResMem in numpy, and every bad input refused in one line."""

import json
import shutil
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resmem_ray.cli import main
from resmem_ray.config import load_config
from resmem_ray.errors import ConfigError
from resmem_ray.runtime.instance import QUIET_SERVE
from resmem_ray.store.artifacts import read_split
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.registry import task_for

from .test_pipeline import one_error_line

CLASSES, DIM = 10, 16
SIZES = {"train": 1000, "val": 300, "test": 300}
ARGS = ["--config", "jobs/configs/precomputed.yaml", "index.cpus_per_shard=0.5", "evaluate.knn_ks=[1,10]",
        "resmem.k=10", "resmem.sigma=0.3", "resmem.temperature=2.0"]
GRID = ["tune.k=[5,10]", "tune.sigma=[0.1]", "tune.temperature=[2.0]", "tune.gate=[1.0]",
        "tune.knn_lambda=[0.5]", "tune.knn_tau=[0.1]", "tune.learned_gate=false"]


def test_the_source_picks_the_task_whatever_model_name_says():
    assert task_for(load_config("jobs/configs/precomputed.yaml", ("model.name=resnet20",))).name == "precomputed"
    with pytest.raises(ConfigError, match=r"^config key data.limit=10 does not apply to model.source=precomputed: "
                                          "every row of model.path is read as it is$"):
        load_config("jobs/configs/precomputed.yaml", ("data.limit=10",))


def mixture(seed: int = 0) -> dict:
    """Gaussian clusters, one per class, and a weak model: a third of its top classes are wrong."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (CLASSES, DIM))
    data = {}
    for name, n in SIZES.items():
        y = rng.integers(0, CLASSES, n)
        guess = np.where(rng.random(n) < 0.35, rng.integers(0, CLASSES, n), y)
        data[name] = {"embedding": (means[y] + rng.normal(0, 0.8, (n, DIM))).astype(np.float32),
                      "logits": (2 * np.eye(CLASSES)[guess] + rng.normal(0, 1, (n, CLASSES))).astype(np.float32),
                      "label": y}
    return data


def column(values, fixed: bool):
    if isinstance(values, np.ndarray) and values.ndim == 2:  # fixed-size lists for train, plain lists elsewhere
        return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1]) if fixed \
            else pa.array(list(values))
    return pa.array(values)


def write_parquet(root, data: dict):
    """train.parquet, val.parquet and test/ as two parquet parts."""
    root.mkdir(parents=True, exist_ok=True)
    for name, columns in data.items():
        table = pa.table({c: column(v, name == "train") for c, v in columns.items()})
        if name == "test":
            (root / name).mkdir()
            half = table.num_rows // 2
            pq.write_table(table.slice(0, half), root / name / "part-0.parquet")
            pq.write_table(table.slice(half), root / name / "part-1.parquet")
        else:
            pq.write_table(table, root / f"{name}.parquet")
    return root


def write_npy(root, data: dict):
    for name, columns in data.items():
        (root / name).mkdir(parents=True)
        for c, v in columns.items():
            np.save(root / name / f"{c}.npy", v)
    return root


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def brute_resmem(data: dict, split: str, k: int, sigma: float, temperature: float, gate: float) -> np.ndarray:
    """p + gate * sum_i w_i r_i over the exact k nearest train rows (L2 of unit rows, ties
    to the smaller id), w = softmax(-d / sigma), r = onehot(y) - softmax(logits / T)."""
    unit = lambda x: x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)  # noqa: E731
    train, query = data["train"], data[split]
    d = np.sqrt(np.maximum(((unit(query["embedding"])[:, None] - unit(train["embedding"])[None]) ** 2).sum(-1), 0))
    near = np.argsort(d, axis=1, kind="stable")[:, :k]  # train rows are in id order
    r = np.eye(CLASSES)[train["label"]] - softmax(train["logits"].astype(np.float64) / temperature)
    w = softmax(-np.take_along_axis(d, near, 1) / sigma)
    return softmax(query["logits"].astype(np.float64) / temperature) + gate * np.einsum("nk,nkc->nc", w, r[near])


def assert_same_classes(predicted: np.ndarray, probs: np.ndarray):
    """Equal argmax wherever the brute-force answer is not a near tie (float32 search)."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(predicted[clear], probs.argmax(1)[clear])


@pytest.fixture(scope="module")
def data():
    return mixture()


@pytest.fixture(scope="module")
def source(data, tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("given") / "rows", data)


@pytest.fixture(scope="module")
def pre_run(ray_session, source, tmp_path_factory):
    """A finished precomputed run (train, embed, index, evaluate) over `source`."""
    run_dir = tmp_path_factory.mktemp("pre") / "run"
    assert main(["run", *ARGS, f"run_dir={run_dir}", f"model.path={source}"]) == 0
    return run_dir


def args_of(run_dir, source, *more):
    return [*ARGS, f"run_dir={run_dir}", f"model.path={source}", *more]


def predictions(run_dir) -> dict:
    return pq.read_table(run_dir / "report" / "predictions.parquet").to_pydict()


def test_run_and_tune_give_brute_force_resmem(pre_run, source, data, tmp_path):
    meta = json.loads((pre_run / "model" / "meta.json").read_text())
    assert (meta["num_classes"], meta["embedding_dim"]) == (CLASSES, DIM)
    assert meta["splits"] == {n: {"format": "parquet", "outputs": "logits", "rows": r} for n, r in SIZES.items()}
    assert sorted(p.name for p in (pre_run / "model").iterdir()) == ["meta.json"]  # no weights
    # the embedding rows are the classification tasks': ids are row numbers across the splits
    run, offset = RunDir(pre_run), 0
    for name, n in SIZES.items():
        rows = read_split(run, name, "test")
        np.testing.assert_array_equal(rows["id"], offset + np.arange(n))
        np.testing.assert_array_equal(rows["embedding"], data[name]["embedding"])
        np.testing.assert_array_equal(rows["logits"], data[name]["logits"])
        assert rows["embedding"].dtype == rows["logits"].dtype == np.float32
        offset += n

    preds = predictions(pre_run)
    assert preds["id"] == list(range(1300, 1600))
    expected = brute_resmem(data, "test", k=10, sigma=0.3, temperature=2.0, gate=1.0)
    assert_same_classes(np.array(preds["resmem"]), expected)
    assert np.sum(np.array(preds["resmem"]) != np.array(preds["base"])) >= 10  # the memory changed answers
    report = (pre_run / "report" / "report.md").read_text()
    assert f"# ResMem report: my_data, precomputed embeddings ({source})" in report

    tuned = tmp_path / "run"  # tune on a copy: the other tests read the run as `resmem run` left it
    shutil.copytree(pre_run, tuned)
    assert main(["tune", *args_of(tuned, source, *GRID)]) == 0
    summary = json.loads((tuned / "tune" / "best.json").read_text())
    assert summary["trials"] == 2
    best = summary["best"]
    val = brute_resmem(data, "val", best["k"], best["sigma"], best["temperature"], best["gate"])
    assert summary["best_val_accuracy"] == pytest.approx((val.argmax(1) == data["val"]["label"]).mean(), abs=2 / 300)
    metrics = json.loads((tuned / "report" / "metrics.json").read_text())
    assert {k: metrics["resmem"][k] for k in best} == best
    test = brute_resmem(data, "test", best["k"], best["sigma"], best["temperature"], best["gate"])
    assert_same_classes(np.array(predictions(tuned)["resmem"]), test)


def test_npy_and_probabilities_give_the_same_rows(pre_run, data, tmp_path):
    """The npy layout, with probabilities: log p differs from the logits by a constant per
    row, so the memory's residuals and every prediction are the same at any T."""
    given = {n: {"embedding": c["embedding"], "probs": softmax(c["logits"].astype(np.float64)), "label": c["label"]}
             for n, c in data.items()}
    source = write_npy(tmp_path / "npy", given)
    run_dir = tmp_path / "run"
    assert main(["train", *args_of(run_dir, source)]) == 0
    assert main(["embed", *args_of(run_dir, source)]) == 0
    meta = json.loads((run_dir / "model" / "meta.json").read_text())
    assert meta["splits"]["val"] == {"format": "npy", "outputs": "probs", "rows": 300}
    for name in SIZES:
        ours, theirs = read_split(RunDir(run_dir), name, "test"), read_split(RunDir(pre_run), name, "test")
        for c in ("id", "label", "embedding"):
            np.testing.assert_array_equal(ours[c], theirs[c])
        for t in (1.0, 2.0):
            np.testing.assert_allclose(softmax(ours["logits"] / t), softmax(theirs["logits"] / t), atol=1e-5)


def test_an_s3_folder_gives_the_same_rows(pre_run, data, s3, tmp_path, monkeypatch):
    """model.path on an object store through pyarrow.fs; its npy files are read, not mapped."""
    import pyarrow.fs

    for key, value in s3.CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    local = write_parquet(tmp_path / "given", {n: data[n] for n in ("train", "test")})
    write_npy(local, {"val": data["val"]})
    pyarrow.fs.copy_files(str(local), f"{s3.bucket}/given", destination_filesystem=s3.fs)
    run_dir = tmp_path / "run"
    assert main(["train", *args_of(run_dir, s3.uri("given"))]) == 0
    assert main(["embed", *args_of(run_dir, s3.uri("given"))]) == 0
    assert json.loads((run_dir / "model" / "meta.json").read_text())["splits"]["val"]["format"] == "npy"
    for name in SIZES:
        ours, theirs = read_split(RunDir(run_dir), name, "test"), read_split(RunDir(pre_run), name, "test")
        for c in ("id", "label", "embedding", "logits"):
            np.testing.assert_array_equal(ours[c], theirs[c])


def test_a_changed_file_makes_train_onward_stale(pre_run, source, data, tmp_path, capsys):
    path = source / "val.parquet"
    original = path.read_bytes()
    changed = {**data["val"], "embedding": data["val"]["embedding"] + 1}
    pq.write_table(pa.table({c: column(v, False) for c, v in changed.items()}), path)
    try:
        capsys.readouterr()
        assert main(["status", str(pre_run)]) == 0
        out = capsys.readouterr().out
        for stage in ("train", "embed"):
            assert f"| {stage} | stale | {source} changed since the stage read it |" in out
        # `resmem embed` alone refuses files that train did not check
        copy = tmp_path / "run"
        shutil.copytree(pre_run, copy)
        assert main(["embed", *args_of(copy, source)]) == 2
        assert one_error_line(capsys) == (f"resmem: error: model.path={source} changed since `resmem train` "
                                          "checked it: run `resmem train` (or `resmem run`) again")
    finally:
        path.write_bytes(original)
    assert main(["status", str(pre_run)]) == 0
    assert "stale" not in capsys.readouterr().out


def drop(split, column):
    return lambda d: d[split].pop(column)


def put(split, column, value):
    return lambda d: d[split].__setitem__(column, value(d) if callable(value) else value)


def at_row(split, column, row, value):
    def change(d):
        d[split][column] = d[split][column].astype(np.float64 if column != "label" else np.int64).copy()
        d[split][column][row] = value
    return change


def ragged(d):
    d["val"]["embedding"] = [e[:-1] if i == 3 else e for i, e in enumerate(d["val"]["embedding"])]


def as_probs(d):
    for c in d.values():
        c["probs"] = softmax(c.pop("logits").astype(np.float64))


def probs_row(row, value):
    def change(d):
        as_probs(d)
        d["test"]["probs"][row] = value
    return change


def ids_from(make):
    """An id column in every split: make(split number, rows)."""
    def change(d):
        for i, name in enumerate(SIZES):
            d[name]["id"] = make(i, SIZES[name]).astype(np.int64)
    return change


BAD = [  # (name, layout, change to the good rows, the line, with {S} for model.path)
    ("missing split", "parquet", lambda d: d.pop("val"),
     "model.path={S}: no split 'val' (put val.parquet there, or a val/ folder of parquet parts or of .npy files)"),
    ("missing column", "parquet", drop("train", "label"),
     "{S}/train.parquet (split train): no column label (it has embedding, logits)"),
    ("logits and probs", "parquet", put("val", "probs", lambda d: softmax(d["val"]["logits"])),
     "{S}/val.parquet (split val): both logits and probs columns: keep one (it has embedding, logits, label, probs)"),
    ("ragged rows", "parquet", ragged,
     "{S}/val.parquet (split val): column embedding: row 0 has 16 values, row 3 has 15 "
     "(not 2-D: every row needs the same number)"),
    ("npy not 2-D", "npy", put("train", "embedding", lambda d: d["train"]["embedding"].reshape(1000, 4, 4)),
     "{S}/train/embedding.npy (split train): shape (1000, 4, 4), not 2-D (N, D)"),
    ("other dim", "parquet", put("val", "embedding", lambda d: d["val"]["embedding"][:, :15]),
     "{S}/val.parquet (split val): embedding has 15 values per row, train's has 16"),
    ("other classes", "parquet", put("test", "logits", lambda d: d["test"]["logits"][:, :9]),
     "{S}/test/ (split test): logits has 9 values per row, train's has 10 (the number of classes)"),
    ("NaN", "parquet", at_row("test", "embedding", 160, np.nan),
     "{S}/test/part-1.parquet (split test): column embedding, row 10: NaN or inf"),
    ("inf", "npy", at_row("val", "logits", 2, np.inf),
     "{S}/val/logits.npy (split val): row 2: NaN or inf"),
    ("probs outside", "parquet", probs_row(7, np.r_[1.5, -0.5, np.zeros(8)]),
     "{S}/test/part-0.parquet (split test): column probs, row 7: probabilities outside [0, 1] (min -0.5, max 1.5)"),
    ("probs sum", "parquet", probs_row(8, np.full(10, 0.2)),
     "{S}/test/part-0.parquet (split test): column probs, row 8: probabilities sum to 2, not 1 "
     "(give logits instead, or normalised probabilities)"),
    ("float labels", "parquet", put("train", "label", lambda d: d["train"]["label"].astype(np.float64)),
     "{S}/train.parquet (split train): column label is double, not integers"),
    ("label range", "parquet", at_row("train", "label", 4, 12),
     "{S}/train.parquet (split train): column label, row 4: label 12 is outside [0, 10) "
     "(10 classes: the logits' width)"),
    ("duplicate across", "parquet", ids_from(lambda i, n: np.arange(n) + 10 * i),
     "duplicate id 10: {S}/train.parquet (split train): column id, row 10 and {S}/val.parquet (split val): column id, "
     "row 0 (ids must be distinct across every split)"),
    ("negative id", "parquet", ids_from(lambda i, n: np.arange(n) + 2000 * i - 1),
     "{S}/train.parquet (split train): column id, row 0: id -1 is negative (ids must be >= 0)"),
    ("duplicate within", "npy", ids_from(lambda i, n: np.full(n, 5000 + 1000 * i)),
     "duplicate id 5000: {S}/train/id.npy (split train): row 0 and {S}/train/id.npy (split train): row 1 "
     "(ids must be distinct across every split)"),
    ("npy row counts", "npy", put("test", "label", lambda d: d["test"]["label"][:-1]),
     "{S}/test/ (split test): the arrays hold different numbers of rows: embedding.npy 300, logits.npy 300, "
     "label.npy 299"),
]


def snapshot(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("name,layout,change,line", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_leaves_the_run_as_it_was(pre_run, data, tmp_path, capsys, name, layout, change,
                                                             line):
    rows = {n: dict(c) for n, c in data.items()}
    change(rows)
    bad = (write_parquet if layout == "parquet" else write_npy)(tmp_path / "bad", rows)
    before = snapshot(pre_run)
    capsys.readouterr()
    assert main(["train", *args_of(pre_run, bad)]) == 2
    assert one_error_line(capsys) == f"resmem: error: {line.replace('{S}', str(bad))}"
    assert snapshot(pre_run) == before


def test_serve_and_memorize_of_inputs_are_refused(pre_run, source, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(QUIET_SERVE, "0")  # `resmem serve` sets it for its own Ray instance: restored after
    handler = signal.getsignal(signal.SIGTERM)  # and takes SIGTERM
    capsys.readouterr()
    try:
        assert main(["serve", *args_of(pre_run, source)]) == 2
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert one_error_line(capsys) == (
        "resmem: error: a precomputed run (model.source=precomputed) has no model to embed new inputs: "
        "`resmem serve` serves runs with a model (model.source=trained or checkpoint); add precomputed rows "
        "with `resmem memorize --examples rows.parquet`")
    images = tmp_path / "new.npz"
    np.savez(images, images=np.zeros((2, 1, 8, 8), np.uint8), labels=np.zeros(2, np.int64))
    assert main(["memorize", *args_of(pre_run, source), "--examples", str(images)]) == 2
    assert one_error_line(capsys) == (
        f"resmem: error: {images}: a precomputed run (model.source=precomputed) has no model to embed new inputs: "
        "`resmem memorize` adds precomputed rows, a local .parquet file with columns embedding, logits or probs, "
        "and label")


def test_memorize_adds_precomputed_rows(pre_run, source, data, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(pre_run, copy)
    pick = np.arange(0, 300, 10)  # 30 test rows, relabelled
    new = (data["test"]["label"][pick] + 1) % CLASSES
    rows = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"embedding": column(data["test"]["embedding"][pick], False),
                             "logits": column(data["test"]["logits"][pick], False), "label": new}), rows)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"embedding": column(data["test"]["embedding"][:3, :8], False),
                             "logits": column(data["test"]["logits"][:3], False), "label": new[:3]}), wrong)
    assert main(["memorize", *args_of(copy, source), "--examples", str(wrong)]) == 2
    assert one_error_line(capsys) == f"resmem: error: {wrong} (split memorize): embedding has 8 values per row, " \
                                     "the run's has 16"
    assert main(["memorize", *args_of(copy, source), "--examples", str(rows)]) == 0
    index = json.loads((copy / "index" / "manifest.json").read_text())
    assert index["rows"] == SIZES["train"] + 30 and index["memorized"][0]["rows"] == 30
    # a narrow kernel: each memorized copy (distance 0) outweighs the training neighbours
    assert main(["evaluate", *args_of(copy, source, "resmem.sigma=0.01")]) == 0
    preds = predictions(copy)
    resmem = np.array(preds["resmem"])[np.searchsorted(preds["id"], 1300 + pick)]
    assert (resmem == new).mean() >= 0.9
