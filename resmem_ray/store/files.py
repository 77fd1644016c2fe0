"""Files that are never half-written: atomic JSON and folders, content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from resmem_ray.errors import ResMemError


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not text at all (UnicodeDecodeError)
        raise ResMemError(f"{path} is not valid JSON: {e}") from None


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a fresh temporary directory that replaces `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex}.old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def digest(hashes: dict[str, str]) -> str:
    """One hash for a folder's file hashes: what a later stage records of what it read."""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def inside(folder: Path, name: str) -> Path:
    """folder / name, where `name` comes from a manifest: a relative path that stays
    inside `folder`, or a clear error (a manifest is data, never a place to write to)."""
    path = Path(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ResMemError(f"{folder}: the manifest names the file {name!r}, which is not a plain path inside "
                          "the folder: refusing it")
    return folder / path


def verify_hashes(folder: Path, expected: dict[str, str], what: str) -> None:
    for rel, digest_ in expected.items():
        p = inside(folder, rel)
        if not p.is_file():
            raise ResMemError(f"{what}: {p} is missing")
        if sha256(p) != digest_:
            raise ResMemError(f"{what}: {p} does not match its manifest hash (changed or corrupt)")
