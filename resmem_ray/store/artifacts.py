"""Readers and writers of the run's artifacts, each checked against its manifest:

    embeddings/<split>/*.parquet   one row per example (or token): id, label, embedding, ...
    index/manifest.json            the memory's shards: rows, files, hashes
    index/shard-NNNNN.faiss, .npz  a shard's FAISS index and rows (ids, labels, residuals)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from resmem_ray.errors import ResMemError
from resmem_ray.store.files import atomic_dir, read_json, verify_hashes
from resmem_ray.store.rundir import RunDir


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
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise ResMemError(f"{folder} holds no parquet files: rerun `resmem embed`")
    table = pq.read_table(files, columns=list(columns))
    if table.num_rows != entry["rows"][split]:
        raise ResMemError(f"{folder} holds {table.num_rows} rows, the manifest says {entry['rows'][split]}")
    out = {}
    order = np.argsort(table.column("id").to_numpy())
    for c in columns:
        col = table.column(c)
        arr = col.to_numpy() if c in ("id", "label") else np.stack(col.to_numpy(zero_copy_only=False))
        out[c] = np.ascontiguousarray(arr[order])
    return out


def read_index_manifest(run: RunDir, needed_by: str) -> dict:
    run.stage_output("index", needed_by=needed_by)
    path = run.index / "manifest.json"
    if not path.is_file():
        raise ResMemError(f"{path} is missing: rerun `resmem index`")
    return read_json(path)


def load_shard(folder: Path, entry: dict):
    """A shard's FAISS index and rows, each file checked against the index manifest."""
    import faiss

    for name, size in entry["bytes"].items():  # cheap check first: truncated or replaced files
        actual = (folder / name).stat().st_size if (folder / name).is_file() else None
        if actual != size:
            raise ResMemError(f"index shard {entry['shard']}: {folder / name} has "
                              f"{'no file' if actual is None else f'{actual} bytes'}, the manifest says {size} bytes")
    verify_hashes(folder, entry["files"], f"index shard {entry['shard']}")
    name = f"shard-{entry['shard']:05d}"
    index = faiss.read_index(str(folder / f"{name}.faiss"))
    with np.load(folder / f"{name}.npz", allow_pickle=False) as z:
        rows = {k: z[k] for k in ("ids", "labels", "residuals", "residual_ids") if k in z.files}
    if index.ntotal != entry["rows"] or len(rows["ids"]) != entry["rows"]:
        raise ResMemError(f"index shard {entry['shard']}: holds {index.ntotal} vectors, "
                          f"the manifest says {entry['rows']}")
    return index, rows
