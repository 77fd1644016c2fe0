"""Readers and writers of the run's artifacts, each checked against its manifest:

    embeddings/<split>/*.parquet   one row per example (or token): id, label, embedding, ...
    index/manifest.json            the memory's shards: rows, files, hashes
    index/shard-NNNNN.faiss, .npz  a shard's FAISS index and rows (ids, labels, residuals)
    index/memorized/<id>.parquet   rows memorize added (embedding rows), which `resmem index` keeps
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resmem_ray.errors import ResMemError
from resmem_ray.store.files import atomic_dir, digest, inside, read_json, sha256, verify_hashes
from resmem_ray.store.rundir import RunDir, kind


def write_split(ds, run: RunDir, name: str, batch_size: int) -> int:
    """Write a split's embedding rows (a Ray dataset) as parquet under RUN/embeddings/<name>,
    atomically; the number of rows written."""
    with atomic_dir(run.embeddings / name) as tmp:
        ds.write_parquet(str(tmp), min_rows_per_file=max(batch_size, 4096))
        return sum(pq.ParquetFile(p).metadata.num_rows for p in tmp.glob("*.parquet"))


def read_split(run: RunDir, split: str, needed_by: str,
               columns=("id", "label", "embedding", "logits")) -> dict[str, np.ndarray]:
    """A split's embedding table as numpy arrays sorted by id, checked against the manifest."""
    entry = run.stage_output("embed", needed_by=needed_by)
    folder = run.embeddings / split
    expected = {name: h for name, h in entry["outputs"].items() if name.startswith(f"{split}/")}
    files = sorted(folder.glob("*.parquet"))
    if not files or not expected:
        raise ResMemError(f"{folder} holds no parquet files: rerun `resmem embed`")
    if {f"{split}/{p.name}" for p in files} != set(expected):
        raise ResMemError(f"{folder} holds other parquet files than the manifest lists: rerun `resmem embed`")
    verify_hashes(run.embeddings, expected, f"embeddings of split '{split}'")
    try:
        table = pq.read_table(files, columns=list(columns))
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise ResMemError(f"{folder}: unreadable parquet ({str(e).splitlines()[0]})") from None
    if table.num_rows != entry["rows"][split]:
        raise ResMemError(f"{folder} holds {table.num_rows} rows, the manifest says {entry['rows'][split]}")
    out = {}
    order = np.argsort(table.column("id").to_numpy())
    for c in columns:
        col = table.column(c)
        arr = col.to_numpy() if c in ("id", "label") else np.stack(col.to_numpy(zero_copy_only=False))
        out[c] = np.ascontiguousarray(arr[order])
    return out


INDEX_KEYS = ("dim", "rows", "num_classes", "distance", "normalize", "temperature", "residual_dtype", "shards")
SHARD_KEYS = ("shard", "rows", "files", "bytes")
MEMORIZED_KEYS = ("source", "rows", "first_id")


def index_manifest_problem(manifest) -> str | None:
    """What keeps `manifest` (an index manifest as read) from having the keys readers need, or None."""
    if not isinstance(manifest, dict):
        return f"it holds {kind(manifest)}, not a mapping"
    missing = [k for k in INDEX_KEYS if k not in manifest]
    if missing:
        return f"missing {', '.join(missing)}"
    for name, keys, empty in (("shards", SHARD_KEYS, False), ("memorized", MEMORIZED_KEYS, True)):
        items = manifest.get(name, [])
        if not isinstance(items, list) or not (items or empty) or not all(isinstance(i, dict) for i in items):
            return f"{name} is not a {'' if empty else 'non-empty '}list of mappings"
        missing = sorted({k for i in items for k in keys if k not in i})
        if missing:
            return f"{name} entries without {', '.join(missing)}"
    return None


def load_index_manifest(path: Path) -> dict:
    """An index manifest file with the keys readers need, or an error naming the file."""
    manifest = read_json(path)
    problem = index_manifest_problem(manifest)
    if problem:
        raise ResMemError(f"{path} is not an index manifest ({problem})")
    return manifest


def read_index_manifest(run: RunDir, needed_by: str) -> dict:
    """The index manifest, checked against the run's manifest, with the keys readers need."""
    entry = run.stage_output("index", needed_by=needed_by)
    path = run.index / "manifest.json"
    if not path.is_file():
        raise ResMemError(f"{path} is missing: rerun `resmem index`")
    verify_hashes(run.index, {"manifest.json": entry["outputs"].get("manifest.json", "")}, "index manifest")
    try:
        return load_index_manifest(path)
    except ResMemError as e:
        raise ResMemError(f"{e}: rerun `resmem index`") from None


def check_codec(run: RunDir, manifest: dict, codec: str, task: str) -> None:
    """The memory must hold the residual rows (dense, sparse or scalar) the task reads."""
    held = manifest.get("codec", "dense")
    if held != codec:
        raise ResMemError(f"{run.index} holds {held} residuals, the {task} task reads {codec} ones: "
                          "rerun `resmem index`")


def check_k(k: int, rows: int, keys: str | None = None) -> None:
    """A search must not ask for more neighbours than the memory has rows; `keys`: the
    config keys k comes from."""
    if k > rows:
        raise ResMemError(f"k={k}{f' ({keys})' if keys else ''} is larger than the memory ({rows} rows)")


def model_fingerprint(run: RunDir) -> str:
    """One hash of the trained model's files: memorized embeddings are only valid for it."""
    return digest(run.stage_output("train", needed_by="memorize")["files"])


def write_memorized(folder: Path, rows: dict[str, np.ndarray]) -> dict:
    """The embedding rows of one memorize call as folder/memorized/<first id>.parquet
    (written under a temporary name, then renamed); the fields its manifest record keeps."""
    name = f"memorized/{int(rows['id'].min()):012d}.parquet"
    path = folder / name
    path.parent.mkdir(exist_ok=True)
    columns = {c: v if v.ndim == 1 else pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
               for c, v in rows.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # removed by the next lock holder if this dies
    pq.write_table(pa.table(columns), tmp)
    digest_ = sha256(tmp)
    os.replace(tmp, path)
    return {"file": name, "file_sha256": digest_}


def read_memorized(folder: Path, records: list[dict], columns) -> dict[str, np.ndarray]:
    """The memorized rows that `records` (index manifest["memorized"]) name, each file
    checked against its hash, as arrays sorted by id."""
    tables = []
    for m in records:
        path = inside(folder, m["file"])
        if not path.is_file() or sha256(path) != m["file_sha256"]:
            raise ResMemError(f"{path}: memorized rows of {m['source']} are "
                              f"{'missing' if not path.is_file() else 'changed (hash mismatch)'}")
        tables.append(pq.read_table(path, columns=list(columns)))
    table = pa.concat_tables(tables)
    order = np.argsort(table.column("id").to_numpy())
    return {c: np.ascontiguousarray((table.column(c).to_numpy() if table.column(c).type.num_fields == 0
                                     else np.stack(table.column(c).to_numpy(zero_copy_only=False)))[order])
            for c in columns}


def read_memory_split(run: RunDir, needed_by: str, columns) -> dict[str, np.ndarray]:
    """The memory's embedding rows: the train split and the rows memorize added to the
    current index (their ids follow every train id, so the ids stay sorted)."""
    train = read_split(run, "train", needed_by, columns)
    records = read_index_manifest(run, needed_by).get("memorized", [])
    if any("file" not in m for m in records):
        raise ResMemError("the memory holds memorized examples whose embedding rows were not kept: run "
                          f"`resmem index` (it drops them) before `resmem {needed_by}`")
    if not records:
        return train
    extra = read_memorized(run.index, records, columns)
    return {c: np.concatenate([train[c], extra[c]]) for c in columns}


def read_model_meta(run: RunDir, needed_by: str) -> dict:
    """RUN/model/meta.json, after checking every model file against the manifest."""
    entry = run.stage_output("train", needed_by=needed_by)
    verify_hashes(run.model, entry["files"], "trained model")
    return read_json(run.model / "meta.json")


def load_shard(folder: Path, entry: dict):
    """A shard's FAISS index and rows, each file checked against the index manifest."""
    import faiss

    for name, size in entry["bytes"].items():  # cheap check first: truncated or replaced files
        path = inside(folder, name)
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            raise ResMemError(f"index shard {entry['shard']}: {path} has "
                              f"{'no file' if actual is None else f'{actual} bytes'}, the manifest says {size} bytes")
    verify_hashes(folder, entry["files"], f"index shard {entry['shard']}")
    name = f"shard-{int(entry['shard']):05d}"
    index = faiss.read_index(str(folder / f"{name}.faiss"))
    with np.load(folder / f"{name}.npz", allow_pickle=False) as z:
        rows = {k: z[k] for k in ("ids", "labels", "residuals", "residual_ids") if k in z.files}
    if index.ntotal != entry["rows"] or len(rows["ids"]) != entry["rows"]:
        raise ResMemError(f"index shard {entry['shard']}: holds {index.ntotal} vectors, "
                          f"the manifest says {entry['rows']}")
    return index, rows
