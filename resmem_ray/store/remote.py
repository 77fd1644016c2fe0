"""Run directories on local disk or behind a URI (s3://, gs://, any pyarrow.fs filesystem).

Stage code reads and writes plain local paths. For a URI run directory those paths are a
local mirror (RESMEM_CACHE, default ~/.cache/resmem/runs/<hash of the URI>), and RunDir
syncs it with the filesystem through pyarrow.fs:

- pull (on open): the manifest, then every output file it vouches for (a finished
  stage's `outputs` hashes) that the mirror does not hold yet;
- push (when a stage is marked done): the stage's output folder replaces the remote one,
  then the manifest, in one PUT, last. The remote manifest marks the stage `running`
  from its start until that final write, so a reader never trusts a half-uploaded stage.

Ray Train writes its checkpoints to the URI itself (RunConfig storage_path +
storage_filesystem). S3-compatible servers (MinIO, moto, ...) take pyarrow's URI
options: s3://bucket/run?endpoint_override=host:port&scheme=http&region=us-east-1.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

from resmem_ray.errors import ResMemError
from resmem_ray.stage_table import STAGES
from resmem_ray.store.files import digest, inside, read_json, sha256, write_json

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
SYNCED = ".synced.json"  # in the mirror: relative path -> sha256 of the copy held there
_MIRRORS: dict[str, str] = {}  # this process's mirrors: local root -> URI


def uri_of(path) -> tuple[str, str] | None:
    """(run URI, folder) when `path` is a folder of a URI run's local mirror opened in this
    process: actors on other nodes open the URI, where this path does not exist."""
    path = Path(path)
    for root, uri in _MIRRORS.items():
        if path.parent == Path(root):
            return uri, path.name
    return None


def is_uri(path: str) -> bool:
    """s3://bucket/x, gs://bucket/x, file:///x ... (a Windows drive letter is not a scheme)."""
    return bool(_URI.match(str(path)))


def open_uri(uri: str):
    """(pyarrow filesystem, path inside it) of a run directory URI."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as e:
        raise ResMemError(f"run_dir={uri!r}: pyarrow.fs cannot open it: {e}") from None


def mirror_dir(uri: str) -> Path:
    cache = Path(os.environ.get("RESMEM_CACHE", Path.home() / ".cache" / "resmem"))
    name = re.sub(r"[^A-Za-z0-9]+", "-", uri.split("?")[0].split("://", 1)[1]).strip("-")[-40:]
    return cache / "runs" / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


class RemoteRun:
    """The pyarrow.fs side of a URI run directory and its local mirror."""

    def __init__(self, uri: str, mirror: Path):
        self.uri, self.mirror = uri, mirror
        self.fs, self.base = open_uri(uri)
        _MIRRORS[str(mirror)] = uri

    def _remote(self, rel: str) -> str:
        return f"{self.base.rstrip('/')}/{rel}"

    def _synced(self) -> dict:
        p = self.mirror / SYNCED
        return read_json(p) if p.is_file() else {}

    def _record(self, hashes: dict) -> None:
        write_json(self.mirror / SYNCED, {**self._synced(), **hashes})

    def exists(self, rel: str) -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self._remote(rel)).type != pyarrow.fs.FileType.NotFound

    def download(self, rel: str) -> None:
        """One file into the mirror, under a temporary name then renamed (actors on one
        host may pull the same run at once)."""
        dst = self.mirror / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
        try:
            with self.fs.open_input_stream(self._remote(rel)) as src, open(tmp, "wb") as out:
                while block := src.read(1 << 22):
                    out.write(block)
            os.replace(tmp, dst)
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            raise ResMemError(f"{self.uri}: {rel} is missing (listed by the run's manifest)") from None

    def upload(self, rel: str) -> None:
        with open(self.mirror / rel, "rb") as src, self.fs.open_output_stream(self._remote(rel)) as out:
            while block := src.read(1 << 22):
                out.write(block)

    def pull(self, folders: tuple[str, ...] | None = None) -> None:
        """The manifest, then each vouched-for output (of `folders`, default all) that the
        mirror lacks."""
        if not self.exists("manifest.json"):
            return  # a new run
        self.download("manifest.json")
        manifest = read_json(self.mirror / "manifest.json")
        synced, fetched = self._synced(), {}
        stages = manifest.get("stages", {}) if isinstance(manifest, dict) else None
        if not isinstance(stages, dict):
            raise ResMemError(f"{self.uri}/manifest.json is not a run manifest (no stages mapping)")
        for stage, entry in stages.items():
            if stage not in STAGES:
                raise ResMemError(f"{self.uri}/manifest.json lists an unknown stage {stage!r}: refusing to pull it")
            if not isinstance(entry, dict) or entry.get("status") != "done":
                continue
            folder = STAGES[stage].folder  # where this stage writes, whatever the manifest says
            if not folder or (folders is not None and folder not in folders):
                continue
            for name, recorded in entry.get("outputs", {}).items():
                rel = str(inside(self.mirror / folder, name).relative_to(self.mirror))
                if synced.get(rel) != recorded or not (self.mirror / rel).is_file():
                    self.download(rel)
                    fetched[rel] = recorded
        if fetched:
            self._record(fetched)

    def push_manifest(self) -> None:
        self.upload("manifest.json")

    def push_folder(self, folder: str, hashes: dict[str, str]) -> None:
        """Replace the remote folder by the mirror's (stale files of an earlier run go)."""
        import pyarrow.fs

        remote = self._remote(folder)
        if self.fs.get_file_info(remote).type == pyarrow.fs.FileType.Directory:
            self.fs.delete_dir_contents(remote)
        for name in hashes:
            self.upload(f"{folder}/{name}")
        self._record({f"{folder}/{name}": digest for name, digest in hashes.items()})

    def delete(self, folder: str) -> None:
        import pyarrow.fs

        remote = self._remote(folder)
        if self.fs.get_file_info(remote).type == pyarrow.fs.FileType.Directory:
            self.fs.delete_dir(remote)


_SHA256: dict[tuple, str] = {}  # (path, size, mtime): a file's sha256, hashed once per process


def _local_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = sha256(path)
    return _SHA256[key]


def source_digest(path: str) -> str:
    """A fingerprint of files a run reads from outside it (a given model, precomputed
    embeddings): local files and folders by content (sha256), a URI's objects by size and
    modification time, which object stores keep for every object."""
    if not is_uri(path):
        local = Path(path).expanduser()
        if local.is_file():
            return _local_sha256(local)
        if local.is_dir():
            return digest({str(p.relative_to(local)): _local_sha256(p) for p in sorted(local.rglob("*")) if p.is_file()})
        raise ResMemError(f"model.path={path}: no such file or folder")
    import pyarrow.fs

    fs, root = open_uri(path)
    info = fs.get_file_info(root)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise ResMemError(f"model.path={path}: no such object or folder")
    infos = [info] if info.type == pyarrow.fs.FileType.File else fs.get_file_info(
        pyarrow.fs.FileSelector(root, recursive=True))
    return digest({i.path: f"{i.size}:{i.mtime_ns}" for i in infos if i.type == pyarrow.fs.FileType.File})
