"""The run directory: the only coupling between stages.

    RUN/manifest.json      config, stage status, versions, content hashes
    RUN/model/             trained weights (model.pt) + meta.json, epoch metrics
    RUN/embeddings/<split>/*.parquet
    RUN/index/             FAISS shard files + manifest.json
    RUN/transformer/       the neighbour Transformer's weights + meta.json (optional stage)
    RUN/tune/              Ray Tune results, best.json, plots
    RUN/report/            metrics.json, report.md, predictions.parquet, plots

Every artifact is written under a temporary name and renamed into place, so a failed
stage never leaves a half-written output behind; every load checks the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
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
    except json.JSONDecodeError as e:
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


def verify_hashes(folder: Path, expected: dict[str, str], what: str) -> None:
    for rel, digest in expected.items():
        p = folder / rel
        if not p.is_file():
            raise ResMemError(f"{what}: {p} is missing")
        if sha256(p) != digest:
            raise ResMemError(f"{what}: {p} does not match its manifest hash (changed or corrupt)")


# What each stage writes, and the config keys its outputs follow from (each stage also
# follows from every earlier one): `resmem run` skips a stage whose recorded keys and
# output hashes still match.
OUTPUTS = {"train": "model", "embed": "embeddings", "index": "index", "transformer": "transformer", "tune": "tune",
           "evaluate": "report"}
DEPENDS_ON = {"train": ("seed", "data", "model", "train"),
              "embed": ("embed", "resmem.temperature"),
              "index": ("index", "resmem.distance", "resmem.normalize"),
              "transformer": ("neighbour_transformer",),
              "tune": ("tune", "resmem", "evaluate"),
              "evaluate": ("resmem", "evaluate")}


def stage_config(stage: str, config: dict) -> dict:
    """The part of a run's config that `stage`'s outputs depend on."""
    out = {}
    for s in RunDir.STAGES[:RunDir.STAGES.index(stage) + 1]:
        if s == "tune" and stage != "tune":
            continue  # tune is a side branch: train -> embed -> index -> evaluate
        for key in DEPENDS_ON[s]:
            node = config
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            out[key] = node
    return out


class RunDir:
    """Paths and the manifest of one run."""

    STAGES = ("train", "embed", "index", "transformer", "tune", "evaluate")

    def __init__(self, path: str | Path, pull: tuple[str, ...] | None = None):
        """`pull`: for a URI run, the output folders to fetch (default: all)."""
        from resmem_ray.storage import RemoteRun, is_uri, mirror_dir

        self.remote = None
        if is_uri(str(path)):  # stages work on a local mirror, synced with the URI
            self.remote = RemoteRun(str(path), mirror_dir(str(path)))
            self.root = self.remote.mirror
            self.root.mkdir(parents=True, exist_ok=True)
            self.remote.pull(pull)
        else:
            self.root = Path(path).resolve()
        self.location = str(path) if self.remote else str(self.root)  # what another process opens
        self.model = self.root / "model"
        self.embeddings = self.root / "embeddings"
        self.index = self.root / "index"
        self.transformer = self.root / "transformer"
        self.report = self.root / "report"
        self.manifest_path = self.root / "manifest.json"

    def manifest(self) -> dict:
        if self.manifest_path.is_file():
            return read_json(self.manifest_path)
        return {"stages": {}}

    def stage_output(self, stage: str, needed_by: str) -> dict:
        """The manifest entry of a finished stage, or a clear error naming what is missing."""
        entry = self.manifest().get("stages", {}).get(stage)
        if not entry or entry.get("status") != "done":
            raise ResMemError(f"run directory {self.root} has no finished '{stage}' stage, which "
                              f"'{needed_by}' needs: run `resmem {stage}` first")
        return entry

    def mark_running(self, stage: str, config: dict) -> None:
        """Record that `stage` started; the outputs of later stages become stale."""
        manifest = self.manifest()
        stages = manifest.setdefault("stages", {})
        for later in self.STAGES[self.STAGES.index(stage) + 1:]:
            stages.pop(later, None)  # their outputs no longer follow from this stage's
        stages[stage] = {"status": "running", "started_at": time.time(), "config": config}
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.manifest_path, manifest)
        if self.remote:
            self.remote.push_manifest()

    def train_storage(self) -> tuple[str, object]:
        """(storage_path, storage_filesystem) for Ray Train's RunConfig: the URI itself."""
        if self.remote:
            return self.remote.base, self.remote.fs
        return str(self.root), None

    def delete(self, folder: str) -> None:
        """Remove a folder of the run (and of its URI)."""
        shutil.rmtree(self.root / folder, ignore_errors=True)
        if self.remote:
            self.remote.delete(folder)

    def update_outputs(self, stage: str) -> None:
        """Record (and push) a finished stage's outputs after a legitimate change (memorize)."""
        manifest = self.manifest()
        entry = manifest["stages"][stage]
        entry["outputs"] = file_hashes(self.root / OUTPUTS[stage])
        write_json(self.manifest_path, manifest)
        self._push(stage, entry["outputs"])

    def _push(self, stage: str, outputs: dict) -> None:
        if self.remote:  # outputs first, the manifest (the commit) last
            self.remote.push_folder(OUTPUTS[stage], outputs)
            self.remote.push_manifest()

    def mark_done(self, stage: str, config: dict, **info) -> None:
        from resmem_ray import versions

        manifest = self.manifest()
        manifest["config"] = config
        manifest["versions"] = versions()
        stages = manifest.setdefault("stages", {})
        started = stages.get(stage, {}).get("started_at")
        now = time.time()
        outputs = self.root / OUTPUTS[stage]
        stages[stage] = {"status": "done", "started_at": started, "finished_at": now,
                         "seconds": None if started is None else round(now - started, 2), "config": config,
                         "outputs": file_hashes(outputs) if outputs.is_dir() else {}, **info}
        write_json(self.manifest_path, manifest)
        self._push(stage, stages[stage]["outputs"])

    def stale_reason(self, stage: str, config: dict) -> str | None:
        """Why `stage` must run again with `config`, or None when its recorded config keys
        and output hashes still match (the stage can be skipped)."""
        entry = self.manifest().get("stages", {}).get(stage)
        if not entry or entry.get("status") != "done" or "outputs" not in entry:
            return "not finished"
        if stage_config(stage, entry.get("config", {})) != stage_config(stage, config):
            return "config changed"
        folder = self.root / OUTPUTS[stage]
        actual = file_hashes(folder) if folder.is_dir() else {}
        if actual != entry["outputs"]:
            return f"{folder} does not match the manifest"
        return None
