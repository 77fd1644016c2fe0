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
from resmem_ray.store.files import atomic_dir, digest, inside, read_json, sha256, verify_hashes, write_json
from resmem_ray.store.rundir import RunDir, kind


FILE_GROUPS = 8  # row groups (tables) per parquet part that write_split writes from this process


def write_split(rows, run: RunDir, name: str, batch_size: int) -> int:
    """Write a split's embedding rows as parquet under RUN/embeddings/<name>, atomically;
    the number of rows written. `rows`: a Ray dataset, or Arrow tables in id order (one
    held at a time), each written from this process as one row group (its id range in
    the statistics that plan_shards reads)."""
    with atomic_dir(run.embeddings / name) as tmp:
        if hasattr(rows, "write_parquet"):  # a Ray dataset
            rows.write_parquet(str(tmp), min_rows_per_file=max(batch_size, 4096))
        else:
            _write_tables(rows, tmp)
        return sum(pq.ParquetFile(p).metadata.num_rows for p in tmp.glob("*.parquet"))


def _write_tables(tables, folder: Path) -> None:
    writer, groups, part = None, 0, 0
    try:
        for table in tables:
            if writer is None:
                writer = pq.ParquetWriter(folder / f"part-{part:05d}.parquet", table.schema)
            writer.write_table(table, row_group_size=max(1, table.num_rows))
            groups += 1
            if groups == FILE_GROUPS:
                writer.close()
                writer, groups, part = None, 0, part + 1
    finally:
        if writer is not None:
            writer.close()


def _split_files(run: RunDir, split: str, needed_by: str) -> tuple[list[Path], dict, int]:
    """A split's parquet files, checked against the embed manifest (names, hashes): the
    files, their hashes by path relative to the run, and the row count the manifest says."""
    entry = run.stage_output("embed", needed_by=needed_by)
    folder = run.embeddings / split
    expected = {name: h for name, h in entry["outputs"].items() if name.startswith(f"{split}/")}
    files = sorted(folder.glob("*.parquet"))
    if not files or not expected:
        raise ResMemError(f"{folder} holds no parquet files: rerun `resmem embed`")
    if {f"{split}/{p.name}" for p in files} != set(expected):
        raise ResMemError(f"{folder} holds other parquet files than the manifest lists: rerun `resmem embed`")
    verify_hashes(run.embeddings, expected, f"embeddings of split '{split}'")
    return files, {f"embeddings/{name}": h for name, h in expected.items()}, entry["rows"][split]


def table_arrays(table: pa.Table, columns, order=None) -> dict[str, np.ndarray]:
    """A table's columns as numpy arrays (list columns as 2-D), rows in `order` if given."""
    out = {}
    for c in columns:
        arr = table.column(c).to_numpy(zero_copy_only=False)
        arr = np.stack(arr) if arr.dtype == object else arr  # lists come as one array per row
        out[c] = np.ascontiguousarray(arr if order is None else arr[order])
    return out


def read_split(run: RunDir, split: str, needed_by: str,
               columns=("id", "label", "embedding", "logits")) -> dict[str, np.ndarray]:
    """A split's embedding table as numpy arrays sorted by id, checked against the manifest."""
    files, _, rows = _split_files(run, split, needed_by)
    folder = run.embeddings / split
    try:
        table = pq.read_table(files, columns=list(columns))
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise ResMemError(f"{folder}: unreadable parquet ({str(e).splitlines()[0]})") from None
    if table.num_rows != rows:
        raise ResMemError(f"{folder} holds {table.num_rows} rows, the manifest says {rows}")
    return table_arrays(table, columns, np.argsort(table.column("id").to_numpy()))


class TableWriter:
    """A parquet file written a table at a time (a row group each), the schema the first
    table's: per-row results as they come (evaluate's predictions.parquet)."""

    def __init__(self, path: Path):
        self.path, self.writer = path, None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def label_counts(run: RunDir, split: str, needed_by: str, num_classes: int) -> np.ndarray:
    """Examples per class in a split, read a row group's labels at a time."""
    counts = np.zeros(num_classes, np.int64)
    for path in _split_files(run, split, needed_by)[0]:
        file = pq.ParquetFile(path)
        for g in range(file.metadata.num_row_groups):
            labels = file.read_row_group(g, columns=["label"]).column("label").to_numpy()
            counts += np.bincount(labels, minlength=num_classes)[:num_classes]
    return counts


def row_groups(root: Path, rel: str, digest_: str, columns) -> list[dict]:
    """The row groups of one parquet file (`rel`: its path under the run directory `root`),
    read from its metadata only: rows and, where the writer kept statistics, the id range."""
    path = root / rel
    try:
        meta = pq.ParquetFile(path).metadata
        names = meta.schema.to_arrow_schema().names
    except (OSError, ValueError) as e:
        raise ResMemError(f"{path}: unreadable parquet ({str(e).splitlines()[0]})") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise ResMemError(f"{path}: no column {', '.join(missing)} (it holds {', '.join(names)})")
    groups = []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        stats = group.column(names.index("id")).statistics
        ids = [int(stats.min), int(stats.max)] if stats is not None and stats.has_min_max else None
        groups.append({"file": rel, "sha256": digest_, "group": g, "rows": group.num_rows, "ids": ids})
    return groups


def split_row_groups(run: RunDir, split: str, needed_by: str, columns) -> list[dict]:
    """A split's row groups (row_groups), its files checked against the manifest (names,
    hashes, row count) without reading their rows."""
    files, hashes, rows = _split_files(run, split, needed_by)
    groups = [g for p in files for g in row_groups(run.root, str(p.relative_to(run.root)),
                                                   hashes[str(p.relative_to(run.root))], columns)]
    held = sum(g["rows"] for g in groups)
    if held != rows:
        raise ResMemError(f"{run.embeddings / split} holds {held} rows, the manifest says {rows}")
    return groups


def read_pieces(root: Path, pieces: list[dict], columns, run_uri: str | None = None,
                batch_rows: int = 1 << 16) -> dict[str, np.ndarray]:
    """The rows that `pieces` name (rows start:stop of a file's row group; of the group
    ranked by id when piece["by_id"]), sorted by id, only `columns` read, a group's other
    rows dropped batch by batch. With `run_uri` (a URI run) each file is read from this
    host's mirror, checked against its hash and fetched again if it differs: another host's
    `root` can name a stale copy here; without, a file missing under `root` is an error."""
    parts, mirrored = [], {}
    for piece in pieces:
        path = root / piece["file"]
        if run_uri or not path.is_file():
            if piece["file"] not in mirrored:
                mirrored[piece["file"]] = _fetched(run_uri, piece["file"], piece["sha256"], path)
            path = mirrored[piece["file"]]
        try:
            file = pq.ParquetFile(path)
            ids = file.read_row_group(piece["group"], columns=["id"]).column("id").to_numpy()
            rows = np.argsort(ids, kind="stable") if piece["by_id"] else np.arange(len(ids))
            keep = np.zeros(len(ids), bool)
            keep[rows[piece["start"]:piece["stop"]]] = True
            offset = 0
            for batch in file.iter_batches(batch_size=batch_rows, row_groups=[piece["group"]], columns=list(columns)):
                mask, offset = keep[offset:offset + batch.num_rows], offset + batch.num_rows
                if mask.any():  # as arrays: a split's and memorized rows' list types differ
                    parts.append(table_arrays(pa.Table.from_batches([batch]).filter(pa.array(mask)), columns))
        except (OSError, ValueError) as e:
            raise ResMemError(f"{path}: unreadable parquet ({str(e).splitlines()[0]})") from None
    order = np.argsort(np.concatenate([p["id"] for p in parts]), kind="stable")
    return {c: np.concatenate([p[c] for p in parts])[order] for c in columns}


def plan_shards(groups: list[dict], num_shards: int) -> list[list[dict]]:
    """num_shards contiguous shards of the rows of parquet row groups (artifacts.row_groups),
    each a list of pieces (a group's rows start:stop). When the groups' id ranges do not
    overlap (as embed and memorize write them), the plan is in id order, rows of a group
    ranked by id, so shard s holds the same rows as slicing the memory sorted by id;
    otherwise it is in file order (the same exact answers, other shard boundaries)."""
    ordered = sorted(groups, key=lambda g: g["ids"][0]) if all(g["ids"] for g in groups) else None
    by_id = bool(ordered) and all(a["ids"][1] < b["ids"][0] for a, b in zip(ordered, ordered[1:]))
    groups = ordered if by_id else groups
    starts = np.cumsum([0] + [g["rows"] for g in groups])
    bounds = np.linspace(0, starts[-1], num_shards + 1).astype(int)
    plan = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        plan.append([{"file": g["file"], "sha256": g["sha256"], "group": g["group"], "by_id": by_id,
                      "start": int(max(a, first) - first), "stop": int(min(b, first + g["rows"]) - first)}
                     for g, first in zip(groups, starts) if first < b and a < first + g["rows"]])
    return plan


def split_chunks(root: Path, groups: list[dict], columns, max_bytes: int):
    """The rows of a split's row groups (split_row_groups) in chunks of at most ~max_bytes
    (at least one row), in id order where the groups' id ranges do not overlap
    (plan_shards), each read as read_pieces reads it: the whole split is never held."""
    total = sum(g["rows"] for g in groups)
    if not total:
        return
    first = read_first_row(root, next(g for g in groups if g["rows"]), columns)
    row_bytes = max(1, sum(a.nbytes for a in first.values()))
    for pieces in plan_shards(groups, min(total, -(-total * row_bytes // max_bytes))):
        yield read_pieces(root, pieces, columns)


def read_first_row(root: Path, group: dict, columns) -> dict[str, np.ndarray]:
    """The first row of a row group (row_groups), without reading the group."""
    path = root / group["file"]
    try:
        batch = next(pq.ParquetFile(path).iter_batches(batch_size=1, row_groups=[group["group"]],
                                                       columns=list(columns)))
    except (OSError, ValueError, StopIteration) as e:
        raise ResMemError(f"{path}: unreadable parquet ({(str(e) or 'no rows').splitlines()[0]})") from None
    return table_arrays(pa.Table.from_batches([batch]), columns)


def _fetched(run_uri: str | None, rel: str, digest_: str, missing: Path) -> Path:
    from resmem_ray.store.remote import RemoteRun, mirror_dir

    if not run_uri:
        raise ResMemError(f"{missing} is not on this host: a run directory on local disk is read by every "
                          "node (shared storage), or give run_dir as a URI")
    remote = RemoteRun(run_uri, mirror_dir(run_uri))
    path = remote.mirror / rel
    if not path.is_file() or sha256(path) != digest_:
        remote.download(rel)
        if sha256(path) != digest_:
            raise ResMemError(f"{run_uri}: {rel} does not match its manifest hash (changed or corrupt)")
    return path


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


def _memorized_files(folder: Path, records: list[dict]) -> list[Path]:
    """The files of memorized rows that `records` name, each checked against its hash."""
    paths = []
    for m in records:
        path = inside(folder, m["file"])
        if not path.is_file() or sha256(path) != m["file_sha256"]:
            raise ResMemError(f"{path}: memorized rows of {m['source']} are "
                              f"{'missing' if not path.is_file() else 'changed (hash mismatch)'}")
        paths.append(path)
    return paths


def read_memorized(folder: Path, records: list[dict], columns) -> dict[str, np.ndarray]:
    """The memorized rows that `records` (index manifest["memorized"]) name, each file
    checked against its hash, as arrays sorted by id."""
    table = pa.concat_tables([pq.read_table(p, columns=list(columns)) for p in _memorized_files(folder, records)])
    return table_arrays(table, columns, np.argsort(table.column("id").to_numpy()))


def memorized_row_groups(run: RunDir, records: list[dict], columns) -> list[dict]:
    """The row groups (row_groups) of the memorized rows that `records` name, each file
    checked against its hash."""
    return [g for m, p in zip(records, _memorized_files(run.index, records))
            for g in row_groups(run.root, str(p.relative_to(run.root)), m["file_sha256"], columns)]


def _memorized_records(run: RunDir, needed_by: str) -> list[dict]:
    records = read_index_manifest(run, needed_by).get("memorized", [])
    if any("file" not in m for m in records):
        raise ResMemError("the memory holds memorized examples whose embedding rows were not kept: run "
                          f"`resmem index` (it drops them) before `resmem {needed_by}`")
    return records


def read_memory_split(run: RunDir, needed_by: str, columns) -> dict[str, np.ndarray]:
    """The memory's embedding rows: the train split and the rows memorize added to the
    current index (their ids follow every train id, so the ids stay sorted)."""
    train = read_split(run, "train", needed_by, columns)
    records = _memorized_records(run, needed_by)
    if not records:
        return train
    extra = read_memorized(run.index, records, columns)
    return {c: np.concatenate([train[c], extra[c]]) for c in columns}


def read_memory_rows(run: RunDir, needed_by: str, ids: np.ndarray, column: str) -> np.ndarray:
    """One column of the memory rows with these ids (any shape; -1, a neighbour an
    approximate index did not find, gives zeros), read a row group at a time from the train
    split and the memorized rows: only the rows asked for are held."""
    missing = ids < 0
    ids = np.where(missing, ids.max(initial=0), ids) if missing.any() else ids
    wanted = np.unique(ids)
    groups = split_row_groups(run, "train", needed_by, ("id", column))
    groups += memorized_row_groups(run, _memorized_records(run, needed_by), ("id", column))
    found, values = np.zeros(len(wanted), bool), None
    for g in groups:
        if g["ids"] and not ((wanted >= g["ids"][0]) & (wanted <= g["ids"][1])).any():
            continue  # the group's id range holds none of them
        table = pq.ParquetFile(run.root / g["file"]).read_row_group(g["group"], columns=["id", column])
        group_ids = table.column("id").to_numpy()
        at = np.searchsorted(wanted, group_ids)
        hit = (at < len(wanted)) & (wanted[np.minimum(at, len(wanted) - 1)] == group_ids)
        if hit.any():
            rows = table_arrays(table.filter(pa.array(hit)), (column,))[column]
            values = np.zeros((len(wanted), *rows.shape[1:]), rows.dtype) if values is None else values
            values[at[hit]], found[at[hit]] = rows, True
    if not found.all():
        raise ResMemError(f"memory rows {wanted[~found][:5].tolist()} are in the index but not in "
                          f"{run.embeddings / 'train'} or the memorized rows: rerun `resmem index`")
    out = values[np.searchsorted(wanted, ids)]
    out[missing] = 0
    return out


class DiskTable:
    """A table of arrays (nested dicts of arrays whose first axis is the row) written chunk
    by chunk into .npy files and read back memory-mapped (open_disk_table): built as it is
    computed, read by every process on the host from the page cache, never whole in RAM."""

    def __init__(self, folder: Path, rows: int):
        from numpy.lib.format import open_memmap

        self.folder, self.rows, self.filled, self.files, self._open = Path(folder), rows, 0, {}, open_memmap
        self.folder.mkdir(parents=True, exist_ok=True)

    def append(self, tree: dict) -> None:
        flat = dict(_flatten(tree))
        n = len(next(iter(flat.values())))
        for path, a in flat.items():
            if path not in self.files:
                name = f"{len(self.files):03d}.npy"
                self.files[path] = (name, self._open(self.folder / name, "w+", a.dtype, (self.rows, *a.shape[1:])))
            self.files[path][1][self.filled:self.filled + n] = a
        self.filled += n

    def close(self) -> dict:
        """Flush, write the index of files, and return the table opened read-only."""
        if self.filled != self.rows:
            raise ResMemError(f"{self.folder}: {self.filled} rows written, {self.rows} expected")
        for _, array in self.files.values():
            array.flush()
        write_json(self.folder / "table.json", [{"path": list(p), "file": f} for p, (f, _) in self.files.items()])
        return open_disk_table(self.folder)


def _flatten(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, (*prefix, key))
        elif value is not None:
            yield (*prefix, key), value


def open_disk_table(folder: Path) -> dict:
    """A DiskTable's arrays, memory-mapped, in their nested dicts."""
    table: dict = {}
    for entry in read_json(Path(folder) / "table.json"):
        *parents, leaf = entry["path"]
        node = table
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = np.load(Path(folder) / entry["file"], mmap_mode="r")
    return table


def read_model_meta(run: RunDir, needed_by: str) -> dict:
    """RUN/model/meta.json, after checking every model file against the manifest."""
    entry = run.stage_output("train", needed_by=needed_by)
    verify_hashes(run.model, entry["files"], "trained model")
    return read_json(run.model / "meta.json")


def memory_footprint(manifest: dict) -> dict[str, float]:
    """Bytes per memory row on disk, by part: the FAISS index, the rows (ids, labels,
    residuals) and, with index.keep_vectors, the full-precision vectors kept for re-ranking."""
    parts = {"index": ".faiss", "rows": ".npz", "vectors": ".vectors.npy"}
    total = {part: sum(size for s in manifest["shards"] for name, size in s["bytes"].items() if name.endswith(end))
             for part, end in parts.items()}
    rows = max(manifest["rows"], 1)
    return {part: size / rows for part, size in total.items() if size}


def footprint_line(manifest: dict) -> str:
    """One sentence on the memory's bytes per row, for logs and reports."""
    f = memory_footprint(manifest)
    return (f"{sum(f.values()):.0f} bytes per row on disk (" + ", ".join(f"{part} {b:.0f}" for part, b in f.items())
            + f"; residuals {manifest['residual_dtype']})")


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
        rows = {k: z[k] for k in ("ids", "labels", "residuals", "residual_scale", "residual_ids") if k in z.files}
    if f"{name}.vectors.npy" in entry["files"]:  # index.keep_vectors: read only where a re-rank needs them
        rows["vectors"] = np.load(folder / f"{name}.vectors.npy", mmap_mode="r")
    if index.ntotal != entry["rows"] or len(rows["ids"]) != entry["rows"]:
        raise ResMemError(f"index shard {entry['shard']}: holds {index.ntotal} vectors, "
                          f"the manifest says {entry['rows']}")
    if "vectors" in rows and rows["vectors"].shape != (index.ntotal, index.d):
        raise ResMemError(f"index shard {entry['shard']}: {name}.vectors.npy has shape {rows['vectors'].shape}, "
                          f"the index holds {index.ntotal} x {index.d}")
    return index, rows
