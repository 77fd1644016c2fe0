"""Precomputed embeddings (model.source=precomputed): ResMem over a model that ran
elsewhere, from the embeddings, logits (or probabilities) and labels it wrote for every
split. Nothing is trained or embedded here.

model.path is a folder (local, or s3:// / gs:// / any pyarrow.fs URI) holding, for each
split (train, val, test), one of:

    <split>.parquet, or a <split>/ folder of parquet parts (read in name order), with the
        columns embedding (a list of D floats per row), logits or probs (a list of C
        floats), label (an integer in [0, C)) and optionally id (a non-negative integer)
    a <split>/ folder of .npy files: embedding.npy (N, D), logits.npy or probs.npy (N, C),
        label.npy (N,) integers and optionally id.npy (N,) (read a slice at a time, never
        unpickled)

Without ids, an example's id is its row number, counted on across the splits (train
first, then val, then test). The number of classes is the logits' width. Probabilities
become logits as log p, p clipped below at float32's smallest normal number so that a
zero stays finite: softmax(log p / T) at T=1 gives p back (renormalised to sum to 1),
and T > 1 flattens it as it flattens a model's softmax.

The train stage reads and checks every split (load_splits, load_given: before the
manifest entry opens, so a bad file leaves the run as it was) and writes RUN/model/
meta.json, which stands for the model (no weights). Embed writes the rows in the
classification tasks' form (id, label, embedding and logits as float32), so index, tune,
evaluate and the report read them unchanged. A changed file makes train and embed stale.
There is no model to embed new inputs: `resmem serve` refuses the run, and `resmem
memorize --examples` takes precomputed rows (a .parquet file in the split format).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resmem_ray.errors import ConfigError, ResMemError
from resmem_ray.schema import Config
from resmem_ray.store.remote import is_uri, open_uri, source_digest
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.classification import ClassificationTask
from resmem_ray.tasks.registry import register
from resmem_ray.tasks.splits import SPLITS, Split

OUTPUTS = ("logits", "probs")  # a split gives one of the two
FLOOR = float(np.finfo(np.float32).tiny)  # probabilities are clipped here before the log
SUM_TOLERANCE = 1e-3  # how far a row of probabilities may sum from 1
CHUNK = 65536  # rows read at a time by the checks: no split is ever read whole
BLOCK_BYTES = 32 << 20  # about this much of a split at a time in `resmem embed`
NO_MODEL = "a precomputed run (model.source=precomputed) has no model to embed new inputs"


@dataclass
class Rows(Split):
    """One split's precomputed rows, as found: the files' shapes and types are read, the
    rows themselves only chunk by chunk (chunks), so no split is ever held whole."""

    name: str = ""  # the split
    source: str = ""  # the file or folder it was read from, as model.path names it
    kind: str = "logits"  # what the outputs column holds: logits | probs
    layout: str = "parquet"  # parquet | npy
    parts: list = field(default_factory=list)  # parquet: (file, rows) in order; npy: [(folder, rows)]
    files: list = field(default_factory=list)  # parquet: the parts' paths on `fs`
    fs: object = None
    arrays: dict = field(default_factory=dict)  # npy: column -> NpyFile
    widths: dict = field(default_factory=dict)  # embedding, outputs: values per row
    count: int = 0
    has_ids: bool = False  # an id column; else ids are row numbers from `offset`
    offset: int = 0

    def __len__(self) -> int:
        return self.count

    def at(self, column: str, row: int) -> str:
        """Where a row of a column lies, in words: the file, the split, the column, the row."""
        if self.layout == "npy":
            return f"{self.parts[0][0]}/{column}.npy (split {self.name}): row {row}"
        for file, n in self.parts:
            if row < n:
                break
            row -= n
        return f"{file} (split {self.name}): column {column}, row {row}"

    def where(self) -> str:
        return f"{self.source} (split {self.name})"

    def chunks(self, columns=("embedding", "outputs", "label", "id"), size: int | None = None):
        """(first row, {column: array}) for at most `size` rows (CHUNK) at a time, in
        order; list columns as (n, width) arrays, checked as they are read (nulls, ragged
        rows). "outputs" is the logits or probs column; ids are the id column, row numbers
        from `offset` without one, or `ids` where set (memorize numbers the rows itself)."""
        size = size or CHUNK
        read = [c for c in columns if c != "id" or (self.has_ids and self.ids is None)]
        start = 0
        for piece in (self._npy_pieces(read, size) if self.layout == "npy" else self._parquet_pieces(read, size)):
            n = len(next(iter(piece.values()))) if piece else min(size, self.count - start)
            if "id" in columns and "id" not in piece:
                piece["id"] = (self.ids[start:start + n] if self.ids is not None
                               else self.offset + np.arange(start, start + n, dtype=np.int64))
            yield start, piece
            start += n

    def _npy_pieces(self, columns, size):
        names = {"outputs": self.kind}
        for a in range(0, self.count, size):
            yield {c: np.asarray(self.arrays[names.get(c, c)][a:a + size]) for c in columns}

    def _parquet_pieces(self, columns, size):
        names = [self.kind if c == "outputs" else c for c in columns]
        for file, (where, rows) in zip(self.files, self.parts):
            at, row = f"{where} (split {self.name})", 0
            if not names:  # row numbers only
                for a in range(0, rows, size):
                    yield {}
                continue
            with self.fs.open_input_file(file) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=size, columns=names):
                    piece = {}
                    for c, n in zip(columns, names):
                        col = batch.column(n)
                        piece[c] = (_integers(col, at, n, row) if c in ("label", "id")
                                    else _matrix(col, at, n, row, self.widths[c]))
                    row += batch.num_rows
                    yield piece

    def logits(self, outputs: np.ndarray) -> np.ndarray:
        """float32 logits of a chunk's outputs (log p for probabilities)."""
        out = np.asarray(outputs, dtype=np.float32)
        return np.log(np.maximum(out, FLOOR)) if self.kind == "probs" else out

    def max_id(self) -> int:
        if not self.has_ids and self.ids is None:
            return self.offset + self.count - 1
        return max(int(p["id"].max()) for _, p in self.chunks(("id",)))


# --- reading --------------------------------------------------------------------------

def _filesystem(path: str):
    import pyarrow.fs

    if is_uri(path):
        return open_uri(path)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def read_rows(path: str) -> dict[str, Rows]:
    """Every split of model.path, its files' columns, types and widths read (the rows
    are checked, chunk by chunk, by check_rows)."""
    fs, root = _filesystem(path)
    shown = path.split("?")[0].rstrip("/")  # messages name files without a URI's options
    splits, offset = {}, 0
    for name in SPLITS:
        rows = _read_split(fs, root.rstrip("/"), shown, name)
        rows.offset = offset  # without ids: row numbers, counted on across the splits
        offset += len(rows)
        splits[name] = rows
    return splits


def _read_split(fs, root: str, shown: str, name: str) -> Rows:
    from pyarrow.fs import FileSelector, FileType

    is_file = fs.get_file_info(f"{root}/{name}.parquet").type == FileType.File
    is_dir = fs.get_file_info(f"{root}/{name}").type == FileType.Directory
    if is_file and is_dir:
        raise ResMemError(f"model.path={shown}: holds both {name}.parquet and a {name}/ folder: keep one")
    if is_file:
        return _read_parquet(fs, [f"{root}/{name}.parquet"], [f"{shown}/{name}.parquet"], name,
                             f"{shown}/{name}.parquet")
    if not is_dir:
        raise ResMemError(f"model.path={shown}: no split '{name}' (put {name}.parquet there, or a {name}/ folder "
                          "of parquet parts or of .npy files)")
    files = sorted(i.base_name for i in fs.get_file_info(FileSelector(f"{root}/{name}"))
                   if i.type == FileType.File)
    if any(f.endswith(".npy") for f in files):
        return _read_npy(fs, f"{root}/{name}", f"{shown}/{name}", name, files)
    parts = [f for f in files if f.endswith(".parquet")]
    if not parts:
        raise ResMemError(f"{shown}/{name}/ (split {name}): holds neither .parquet parts nor .npy files")
    return _read_parquet(fs, [f"{root}/{name}/{p}" for p in parts], [f"{shown}/{name}/{p}" for p in parts], name,
                         f"{shown}/{name}/")


def _read_parquet(fs, files: list[str], shown: list[str], name: str, source: str) -> Rows:
    """A split from parquet files: each file's columns and types checked, its widths read
    from its schema or its first row; the rows are read by Rows.chunks."""
    kinds, parts, widths = [], [], {"embedding": [], "outputs": []}
    has_ids = False
    for file, where in zip(files, shown):
        at = f"{where} (split {name})"
        try:
            with fs.open_input_file(file) as f:
                pf = pq.ParquetFile(f)
                schema, count = pf.schema_arrow, pf.metadata.num_rows
                have = schema.names
                given = [c for c in OUTPUTS if c in have]
                if len(given) != 1:
                    problem = "both logits and probs columns: keep one" if given else "no column logits or probs"
                    raise ResMemError(f"{at}: {problem} (it has {', '.join(have)})")
                for column in ("embedding", "label"):
                    if column not in have:
                        raise ResMemError(f"{at}: no column {column} (it has {', '.join(have)})")
                if parts and (given[0] != kinds[0] or ("id" in have) != has_ids):
                    raise ResMemError(f"{at}: columns {', '.join(have)}, unlike the split's first part "
                                      f"{parts[0][0]} (every part needs the same columns)")
                first = next(pf.iter_batches(batch_size=1, columns=["embedding", given[0]]), None)
        except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
            raise ResMemError(f"{at}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        kinds.append(given[0])
        has_ids = "id" in have
        for key, column in (("embedding", "embedding"), ("outputs", given[0])):
            _list_type(schema.field(column).type, at, column)
            if first is not None and first.num_rows:
                widths[key].append(_matrix(first.column(column), at, column).shape[1])
        for column in ("label", "id"):
            if column in have and not pa.types.is_integer(schema.field(column).type):
                raise ResMemError(f"{at}: column {column} is {schema.field(column).type}, not integers")
        parts.append((where, count))
    for key, column in (("embedding", "embedding"), ("outputs", kinds[0])):
        if len(set(widths[key])) > 1:
            raise ResMemError(f"{source} (split {name}): the parts' {column} columns have different widths "
                              f"({', '.join(map(str, sorted(set(widths[key]))))})")
    rows = Rows(ids=None, labels=None, name=name, source=source, kind=kinds[0], layout="parquet", parts=parts,
                files=list(files), fs=fs, widths={k: (w[0] if w else 0) for k, w in widths.items()},
                count=sum(n for _, n in parts), has_ids=has_ids)
    _check_not_empty(rows)
    return rows


def _list_type(t, at: str, column: str):
    """The list type under a column's type (a Ray tensor column's storage), checked."""
    if isinstance(t, pa.ExtensionType):
        t = t.storage_type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise ResMemError(f"{at}: column {column} is {t}, not a list of floats per row")
    if not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        raise ResMemError(f"{at}: column {column} holds lists of {t.value_type}, not of floats "
                          "(one flat list per row: the rows are not 2-D)")
    return t


def _matrix(col, at: str, column: str, row: int = 0, width: int | None = None) -> np.ndarray:
    """An (n, width) array from a column of equal-length lists of numbers (rows `row`
    onward of a file: messages count from there; `width`: row 0's)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    _list_type(col.type, at, column)
    arr = col.storage if isinstance(col.type, pa.ExtensionType) else col
    if arr.null_count:
        raise ResMemError(f"{at}: column {column}, row {row + _first(arr.is_null())}: null")
    lengths = pc.list_value_length(arr).to_numpy()
    width = int(lengths[0]) if width is None and len(lengths) else width
    if len(lengths) and (lengths != width).any():
        r = int(np.flatnonzero(lengths != width)[0])
        raise ResMemError(f"{at}: column {column}: row 0 has {width} values, row {row + r} has {lengths[r]} "
                          "(not 2-D: every row needs the same number)")
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False)  # a null value becomes NaN
    return values.reshape(len(arr), width or 0)


def _integers(col, at: str, column: str, row: int = 0) -> np.ndarray:
    if not pa.types.is_integer(col.type):
        raise ResMemError(f"{at}: column {column} is {col.type}, not integers")
    if col.null_count:
        raise ResMemError(f"{at}: column {column}, row {row + _first(col.is_null())}: null")
    return col.to_numpy().astype(np.int64)


def _first(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False)))[0])


def _read_npy(fs, folder: str, shown: str, name: str, files: list[str]) -> Rows:
    at = f"{shown}/ (split {name})"
    given = [c for c in OUTPUTS if f"{c}.npy" in files]
    if len(given) != 1:
        problem = "both logits.npy and probs.npy: keep one" if given else "no logits.npy or probs.npy"
        raise ResMemError(f"{at}: {problem} (it has {', '.join(files)})")
    kind = given[0]
    for needed in ("embedding", "label"):
        if f"{needed}.npy" not in files:
            raise ResMemError(f"{at}: no {needed}.npy (it has {', '.join(files)})")
    names = ["embedding", kind, "label"] + (["id"] if "id.npy" in files else [])
    arrays = {n: _load_npy(fs, f"{folder}/{n}.npy", f"{shown}/{n}.npy", name) for n in names}
    for n, ndim, shape in (("embedding", 2, "(N, D)"), (kind, 2, "(N, C)"), ("label", 1, "(N,)"), ("id", 1, "(N,)")):
        if n in arrays and arrays[n].ndim != ndim:
            raise ResMemError(f"{shown}/{n}.npy (split {name}): shape {arrays[n].shape}, not {ndim}-D {shape}")
    for n in ("embedding", kind):
        if not (np.issubdtype(arrays[n].dtype, np.floating) or np.issubdtype(arrays[n].dtype, np.integer)):
            raise ResMemError(f"{shown}/{n}.npy (split {name}): dtype {arrays[n].dtype}, not floats")
    for n in ("label", "id"):
        if n in arrays and not np.issubdtype(arrays[n].dtype, np.integer):
            raise ResMemError(f"{shown}/{n}.npy (split {name}): dtype {arrays[n].dtype}, not integers")
    counts = {n: len(a) for n, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise ResMemError(f"{at}: the arrays hold different numbers of rows: "
                          + ", ".join(f"{n}.npy {c}" for n, c in counts.items()))
    rows = Rows(ids=None, labels=None, name=name, source=f"{shown}/", kind=kind, layout="npy",
                parts=[(shown, counts["label"])], arrays=arrays, count=counts["label"], has_ids="id" in arrays,
                widths={"embedding": arrays["embedding"].shape[1], "outputs": arrays[kind].shape[1]})
    _check_not_empty(rows)
    return rows


class NpyFile:
    """A C-ordered .npy file read by position, a slice of rows at a time: never
    memory-mapped (the mapped pages read would stay in the driver's resident memory) nor
    read whole, local or on an object store."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        with fs.open_input_file(path) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, self.fortran, self.dtype = read(f)
            self.offset, size = f.tell(), f.size()
        if self.dtype.hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        self.ndim, self.row_bytes = len(self.shape), self.dtype.itemsize * int(np.prod(self.shape[1:]))
        needed = self.offset + self.row_bytes * (self.shape[0] if self.shape else 1)
        if size < needed:
            raise ValueError(f"the file holds {size} bytes, its header says {needed}")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(len(self))
        with self.fs.open_input_file(self.path) as f:
            data = f.read_at(self.row_bytes * max(0, b - a), self.offset + self.row_bytes * a)
        return np.frombuffer(data, self.dtype).reshape((max(0, b - a),) + tuple(self.shape[1:]))


def _load_npy(fs, path: str, shown: str, name: str):
    from pyarrow.fs import LocalFileSystem

    try:
        with fs.open_input_file(path) as f:
            if f.read(4) == b"PK\x03\x04":
                raise ResMemError(f"{shown} (split {name}): an .npz archive, not one .npy array")
        array = NpyFile(fs, path)
        if array.fortran and array.ndim > 1:  # rows are not contiguous: mapped where local, else read whole
            if isinstance(fs, LocalFileSystem):
                return np.load(path, mmap_mode="r", allow_pickle=False)
            with fs.open_input_file(path) as f:
                return np.load(io.BytesIO(f.read()), allow_pickle=False)
        return array
    except (OSError, ValueError, EOFError) as e:  # object arrays (a pickle) are a ValueError: never loaded
        raise ResMemError(f"{shown} (split {name}): not a readable .npy file of numbers "
                          f"({str(e).splitlines()[0]})") from None


def _check_not_empty(rows: Rows) -> None:
    if not len(rows):
        raise ResMemError(f"{rows.where()}: no rows")


# --- checks -----------------------------------------------------------------------------

def check_rows(rows: Rows, dim: int, classes: int, reference: str) -> None:
    """A split's widths against the run's (`reference` says whose), then its values, a
    chunk at a time: finite, probabilities that are distributions, labels among the classes."""
    out = rows.kind
    if rows.widths["embedding"] != dim:
        raise ResMemError(f"{rows.where()}: embedding has {rows.widths['embedding']} values per row, "
                          f"{reference} {dim}")
    if rows.widths["outputs"] != classes:
        raise ResMemError(f"{rows.where()}: {out} has {rows.widths['outputs']} values per row, {reference} "
                          f"{classes} (the number of classes)")
    for a, piece in rows.chunks(("embedding", "outputs", "label")):
        for column, key in (("embedding", "embedding"), (out, "outputs")):
            bad = ~np.isfinite(piece[key]).all(axis=1)
            if bad.any():
                raise ResMemError(f"{rows.at(column, a + _first_true(bad))}: NaN or inf")
        if out == "probs":
            block = np.asarray(piece["outputs"], dtype=np.float64)
            bad = ((block < 0) | (block > 1)).any(axis=1)
            if bad.any():
                r = _first_true(bad)
                raise ResMemError(f"{rows.at(out, a + r)}: probabilities outside [0, 1] "
                                  f"(min {block[r].min():.4g}, max {block[r].max():.4g})")
            sums = block.sum(axis=1)
            bad = np.abs(sums - 1) > SUM_TOLERANCE
            if bad.any():
                r = _first_true(bad)
                raise ResMemError(f"{rows.at(out, a + r)}: probabilities sum to {sums[r]:.4g}, not 1 "
                                  "(give logits instead, or normalised probabilities)")
        labels = piece["label"]
        bad = (labels < 0) | (labels >= classes)
        if bad.any():
            r = _first_true(bad)
            raise ResMemError(f"{rows.at('label', a + r)}: label {labels[r]} is outside [0, {classes}) "
                              f"({classes} classes: the {out}' width)")


def _first_true(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_ids(splits: dict[str, Rows]) -> None:
    """Ids are non-negative (FAISS's -1 means no neighbour) and distinct across all splits.
    Row numbers are both by construction; where a split has an id column, every id of every
    split is held once, sorted (8 bytes a row: 240 MB for 30M rows), and a duplicate's two
    rows are found by a second pass over the ids."""
    if not any(rows.has_ids for rows in splits.values()):
        return
    ids, end = np.empty(sum(len(r) for r in splits.values()), np.int64), 0
    for rows in splits.values():
        for a, piece in rows.chunks(("id",)):
            chunk = piece["id"]
            if rows.has_ids and len(chunk) and chunk.min() < 0:
                r = _first_true(chunk < 0)
                raise ResMemError(f"{rows.at('id', a + r)}: id {chunk[r]} is negative (ids must be >= 0)")
            ids[end:end + len(chunk)], end = chunk, end + len(chunk)
    ids.sort()
    same = np.flatnonzero(ids[1:] == ids[:-1])
    if not len(same):
        return
    value, seen = ids[same[0]], []
    del ids
    for rows in splits.values():
        for a, piece in rows.chunks(("id",)):
            seen += [(rows, a + int(r)) for r in np.flatnonzero(piece["id"] == value)[:2 - len(seen)]]
            if len(seen) == 2:
                (first, i), (second, j) = seen
                raise ResMemError(f"duplicate id {value}: {first.at('id', i)} and {second.at('id', j)} "
                                  "(ids must be distinct across every split)")


def check_unchanged(cfg: Config, run: RunDir, needed_by: str) -> None:
    """The files at model.path are those the train stage checked."""
    seen = (run.stage_output("train", needed_by=needed_by).get("sources") or {}).get(cfg.model.path)
    if source_digest(cfg.model.path) != seen:
        raise ResMemError(f"model.path={cfg.model.path} changed since `resmem train` checked it: "
                          "run `resmem train` (or `resmem run`) again")


# --- the task ---------------------------------------------------------------------------

@register
class Precomputed(ClassificationTask):
    """model.source=precomputed picks this task whatever model.name says (tasks/registry.py)."""

    name = "precomputed"
    reads = {"index": ("resmem.temperature",)}  # the dense residuals' T

    def check_config(self, cfg: Config) -> None:
        for key, value, default in (("data.limit", cfg.data.limit, None),
                                    ("data.imbalance_ratio", cfg.data.imbalance_ratio, 1.0)):
            if value != default:
                raise ConfigError(f"config key {key}={value} does not apply to model.source=precomputed: every row "
                                  "of model.path is read as it is")

    def load_splits(self, cfg: Config):
        return read_rows(cfg.model.path), None

    def load_given(self, cfg: Config, splits: dict, info) -> dict:
        train = splits["train"]
        dim, classes = train.widths["embedding"], train.widths["outputs"]
        if classes < 2:
            raise ResMemError(f"{train.where()}: {train.kind} has {classes} value per row: ResMem needs "
                              "at least 2 classes")
        for rows in splits.values():
            check_rows(rows, dim, classes, "train's has")
        check_ids(splits)
        return {"source": "precomputed", "path": cfg.model.path, "num_classes": int(classes),
                "embedding_dim": int(dim), "fingerprint": source_digest(cfg.model.path),
                "splits": {n: {"format": r.layout, "outputs": r.kind, "rows": len(r)} for n, r in splits.items()}}

    def save_given(self, cfg: Config, run: RunDir, folder, given, splits: dict, info) -> dict:
        return given  # meta.json stands for the model; the rows stay at model.path

    def embed_rows(self, cfg: Config, run: RunDir, split: Rows, split_name: str, meta: dict):
        """The split's rows as Arrow tables of ~BLOCK_BYTES, read from model.path one at a
        time as write_split writes them (nothing to run a model on); memorize's few rows
        as a Ray dataset, as the other tasks give them."""
        import ray.data
        from ray.data.extensions import ArrowTensorArray

        if split_name == SPLITS[0]:  # `resmem embed` on its own: the files must be those train checked
            check_unchanged(cfg, run, "embed")
        step = max(1, BLOCK_BYTES // (4 * (meta["embedding_dim"] + meta["num_classes"])))
        blocks = (pa.table({"id": p["id"], "label": p["label"],
                            "embedding": ArrowTensorArray.from_numpy(np.ascontiguousarray(p["embedding"], np.float32)),
                            "logits": ArrowTensorArray.from_numpy(split.logits(p["outputs"]))})
                  for _, p in split.chunks(size=step))
        return ray.data.from_arrow(list(blocks)) if split_name == "memorize" else blocks

    def embed_info(self, cfg: Config, splits: dict, meta: dict) -> dict:
        return {"max_id": max(rows.max_id() for rows in splits.values())}

    def model_title(self, cfg: Config) -> str:
        return f"precomputed embeddings ({cfg.model.path})"

    def read_examples(self, path: str, meta: dict) -> Rows:
        """Precomputed rows in the split format: one .parquet file with embedding, logits
        or probs, and label (an id column is ignored: memorize numbers the rows itself)."""
        if not str(path).endswith(".parquet") or is_uri(str(path)):
            raise ResMemError(f"{path}: {NO_MODEL}: `resmem memorize` adds precomputed rows, a local .parquet "
                              "file with columns embedding, logits or probs, and label")
        if not Path(path).is_file():
            raise ResMemError(f"{path}: no such file")
        import pyarrow.fs

        rows = _read_parquet(pyarrow.fs.LocalFileSystem(), [str(Path(path).resolve())], [str(path)], "memorize",
                             str(path))
        check_rows(rows, meta["embedding_dim"], meta["num_classes"], "the run's has")
        rows.ids = np.zeros(len(rows), np.int64)
        return rows

    def serve_inputs(self, items: list, meta: dict) -> list:
        raise ResMemError(f"{NO_MODEL}: `resmem serve` serves runs with a model (model.source=trained or "
                          "checkpoint); add precomputed rows with `resmem memorize --examples rows.parquet`")
