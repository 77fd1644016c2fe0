"""The run directory: the only coupling between stages.

    RUN/manifest.json      config, stage status, versions, content hashes
    RUN/model/             trained weights + meta.json, epoch metrics
    RUN/embeddings/<split>/*.parquet
    RUN/index/             FAISS shard files + manifest.json
    RUN/transformer/       the neighbour Transformer's weights + meta.json (optional stage)
    RUN/tune/              Ray Tune results, best.json, plots
    RUN/report/            metrics.json, report.md, predictions.parquet, plots

The manifest describes itself: each stage's entry records its output folder, the hashes
of its outputs, the config it ran with and a digest of the outputs of every stage it
read. So a stage is stale when its config keys changed, its outputs were touched, or
anything it read changed since (a rerun upstream, `resmem memorize`), and rerunning a
stage drops the entries of every stage that read it, transitively.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from resmem_ray.errors import ResMemError
from resmem_ray.stage_table import STAGES
from resmem_ray.store.files import digest, file_hashes, read_json, write_json


def pick(config: dict, keys: list[str]) -> dict:
    """{dotted key: value} of `keys` in a nested config dict (None where absent)."""
    out = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


class RunDir:
    """Paths and the manifest of one run."""

    def __init__(self, path: str | Path, pull: tuple[str, ...] | None = None):
        """`pull`: for a URI run, the output folders to fetch (default: all)."""
        from resmem_ray.store.remote import RemoteRun, is_uri, mirror_dir

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

    def mark_running(self, name: str, config: dict) -> None:
        """Record that stage `name` started; every stage that read its outputs becomes stale."""
        stage = STAGES[name]
        manifest = self.manifest()
        stages = manifest.setdefault("stages", {})
        for reader in readers_of(stages, name):
            stages.pop(reader)  # their outputs no longer follow from this stage's
        stages[name] = {"status": "running", "started_at": time.time(), "config": config,
                        "folder": stage.folder, "reads": list(stage.reads)}
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
        """Record (and push) a finished stage's outputs after a legitimate change (memorize);
        the stages that read them become stale."""
        manifest = self.manifest()
        entry = manifest["stages"][stage]
        entry["outputs"] = file_hashes(self.root / entry["folder"])
        write_json(self.manifest_path, manifest)
        self._push(entry["folder"], entry["outputs"])

    def _push(self, folder: str | None, outputs: dict) -> None:
        if self.remote:  # outputs first, the manifest (the commit) last
            if folder:
                self.remote.push_folder(folder, outputs)
            self.remote.push_manifest()

    def mark_done(self, name: str, config: dict, **info) -> None:
        from resmem_ray import versions

        stage = STAGES[name]
        manifest = self.manifest()
        manifest["config"] = config
        manifest["versions"] = versions()
        stages = manifest.setdefault("stages", {})
        started = stages.get(name, {}).get("started_at")
        now = time.time()
        outputs = self.root / stage.folder if stage.folder else None
        stages[name] = {
            "status": "done", "started_at": started, "finished_at": now,
            "seconds": None if started is None else round(now - started, 2), "config": config,
            "folder": stage.folder, "reads": list(stage.reads), "inputs": input_digests(stages, stage.reads),
            "outputs": file_hashes(outputs) if outputs and outputs.is_dir() else {}, **info}
        write_json(self.manifest_path, manifest)
        self._push(stage.folder, stages[name]["outputs"])

    def stale_reason(self, name: str, config: dict, keys: list[str] | None = None) -> str | None:
        """Why stage `name` must run again with `config`, or None when it can be skipped:
        its recorded values of `keys` (default: the whole config), its output hashes and
        what it read all still match."""
        stage = STAGES[name]
        stages = self.manifest().get("stages", {})
        entry = stages.get(name)
        if not entry or entry.get("status") != "done" or "outputs" not in entry:
            return "not finished"
        old = entry.get("config", {})
        if (old != config) if keys is None else (pick(old, keys) != pick(config, keys)):
            return "config changed"
        now = input_digests(stages, stage.reads)
        if entry.get("inputs") != now:
            changed = [r for r in stage.reads if (entry.get("inputs") or {}).get(r) != now[r]]
            return f"what it read changed: {', '.join(changed)}"
        folder = self.root / stage.folder if stage.folder else None
        actual = file_hashes(folder) if folder and folder.is_dir() else {}
        if actual != entry["outputs"]:
            return f"{folder} does not match the manifest"
        return None


def input_digests(stages: dict, reads) -> dict:
    """A digest of the outputs of each stage read (None: not finished)."""
    out = {}
    for name in reads:
        entry = stages.get(name, {})
        out[name] = digest(entry["outputs"]) if entry.get("status") == "done" and "outputs" in entry else None
    return out


def readers_of(stages: dict, name: str) -> list[str]:
    """Stages whose manifest entries say they read `name`, directly or through others."""
    found, frontier = [], [name]
    while frontier:
        current = frontier.pop()
        for other, entry in stages.items():
            if other not in found and current in entry.get("reads", ()):
                found.append(other)
                frontier.append(other)
    return found
