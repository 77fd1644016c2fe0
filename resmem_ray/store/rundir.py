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

A run directory is marked as one when it is created (RUN/.resmem-run): the suite never
writes into an existing folder that is neither empty nor marked. Commands that write
hold RUN/.lock (an OS file lock, released when the process ends, however it ends) and
say who holds it when they cannot take it.

Every stage with an output folder runs inside its manifest entry (`stage_entry`): the
entry opens (running) where the stage's work begins and closes done with what the stage
returns, or failed / interrupted when it stops, so no stage can leave it open.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Generator

from resmem_ray.errors import ResMemError
from resmem_ray.stage_table import STAGES
from resmem_ray.store.files import digest, file_hashes, read_json, write_json


MARKER = ".resmem-run"
LOCK = ".lock"


NUMBER = (int, float, type(None))
# The fields of a stage's manifest entry that readers rely on, and the types they may hold
ENTRY_FIELDS = {"status": (str,), "config": (dict,), "outputs": (dict,), "inputs": (dict,), "files": (dict,),
                "reads": (list,), "started_at": NUMBER, "finished_at": NUMBER, "seconds": NUMBER}
TYPE_NAMES = {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number",
              type(None): "null"}


def kind(value) -> str:
    """What a JSON value is, in words: "a mapping", "a list", ..."""
    return TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


def manifest_problem(manifest) -> str | None:
    """What keeps `manifest` (a run manifest as read) from having a run manifest's shape, or None."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", {}), dict):
        return "no stages mapping"
    if not isinstance(manifest.get("config", {}), dict):
        return f"its config is {kind(manifest['config'])}, not a mapping"
    for name, entry in manifest.get("stages", {}).items():
        if not isinstance(entry, dict):
            return f"stage '{name}' is {kind(entry)}, not a mapping"
        for field, types in ENTRY_FIELDS.items():
            if field in entry and not isinstance(entry[field], types):
                allowed = " or ".join(dict.fromkeys(TYPE_NAMES[t] for t in types))
                return f"stage '{name}': {field} is {kind(entry[field])}, not {allowed}"
    return None


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
            if self.root.exists() and not self.root.is_dir():
                raise ResMemError(f"run_dir={path} is a file, not a run directory")
        self.location = str(path) if self.remote else str(self.root)  # what another process opens
        self.model = self.root / "model"
        self.embeddings = self.root / "embeddings"
        self.index = self.root / "index"
        self.transformer = self.root / "transformer"
        self.report = self.root / "report"
        self.manifest_path = self.root / "manifest.json"

    def manifest(self) -> dict:
        if self.manifest_path.is_file():
            manifest = read_json(self.manifest_path)
            problem = manifest_problem(manifest)
            if problem:
                raise ResMemError(f"{self.manifest_path} is not a run manifest ({problem}): repair it, or "
                                  "remove it to run every stage again")
            return manifest
        return {"stages": {}}

    def is_run_dir(self) -> bool:
        return (self.root / MARKER).is_file() or self.manifest_path.is_file()

    def claim(self) -> None:
        """Make sure stages may write here: create and mark a new run directory; refuse a
        folder that is neither empty nor a run directory (it is someone's data)."""
        if self.root.is_dir() and not self.is_run_dir() and any(self.root.iterdir()):
            raise ResMemError(f"run_dir={self.root} is a folder that is not empty and not a resmem run "
                              f"directory (no {MARKER} or manifest.json): refusing to write into it; "
                              "choose a new or empty folder")
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / MARKER).is_file():
            write_json(self.root / MARKER, {"created_at": time.time(), "by": "resmem-ray"})

    @contextlib.contextmanager
    def lock(self, command: str):
        """Hold the run directory's lock for the block; a clear error naming the holder
        when another process has it. Leftovers of killed writers are removed once held."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.root / LOCK), timeout=0)
        holder_path = self.root / (LOCK + ".holder")
        try:
            lock.acquire()
        except Timeout:
            try:
                holder = json.loads(holder_path.read_text())
            except (OSError, ValueError):
                holder = {}
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            raise ResMemError(f"run directory {self.root} is in use by pid {holder.get('pid', '?')} on "
                              f"{holder.get('host', '?')} since {since} ({holder.get('command', 'unknown')}): "
                              "wait for it to finish") from None
        try:
            write_json(holder_path, {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                     "since": time.time()})
            self.remove_leftovers()
            yield
        finally:
            holder_path.unlink(missing_ok=True)
            lock.release()

    def remove_leftovers(self) -> None:
        """Temporary files and folders of a writer that was killed (SIGKILL) mid-write."""
        folders = [self.root, *(p for p in self.root.iterdir() if p.is_dir()), self.root / "index" / "memorized"]
        for folder in (f for f in folders if f.is_dir()):
            for p in folder.glob(".*.*.tmp"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            for p in folder.glob(".*.*.old"):
                shutil.rmtree(p, ignore_errors=True)

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

    def mark_stopped(self, error: BaseException, name: str | None = None) -> None:
        """Record that stage `name` (default: every running stage; the caller holds the
        lock, so each is its own) stopped without finishing: interrupted by Ctrl-C, else
        failed, with the error."""
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        message = str(getattr(error, "cause", None) or error) or type(error).__name__
        manifest = self.manifest()
        running = [e for n, e in manifest.get("stages", {}).items()
                   if e.get("status") == "running" and name in (None, n)]
        for entry in running:
            entry.update(status=status, error=message[:500], stopped_at=time.time())
        if running:
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
        from resmem_ray.store.remote import source_digest

        for path, seen in sources_read(stages, name).items():  # files read from outside the run
            try:
                if source_digest(path) != seen:
                    return f"{path} changed since the stage read it"
            except ResMemError as e:
                return str(e)
        now = input_digests(stages, stage.reads)
        if entry.get("inputs") != now:
            changed = [r for r in stage.reads if (entry.get("inputs") or {}).get(r) != now[r]]
            return f"what it read changed: {', '.join(changed)}"
        folder = self.root / stage.folder if stage.folder else None
        actual = file_hashes(folder) if folder and folder.is_dir() else {}
        if actual != entry["outputs"]:
            return f"{folder} does not match the manifest"
        return None


StageSteps = Generator[RunDir, None, tuple]  # what a function under stage_entry is


def stage_entry(name: str):
    """Run a stage function inside its manifest entry. The function is a generator: it
    checks what it needs, yields its RunDir where its work begins (the entry opens:
    running, the entries of its readers dropped), and returns (value, info): its callers
    get value, the entry records info (done). A stop after the yield marks the entry
    failed, or interrupted on Ctrl-C; an error before it leaves the manifest as it was."""
    def wrap(steps):
        if not inspect.isgeneratorfunction(steps):
            raise TypeError(f"stage {name}: {steps.__qualname__} must yield its RunDir where its work begins")

        @functools.wraps(steps)
        def in_entry(cfg, *args, **kwargs):
            config = cfg.to_dict()
            work = steps(cfg, *args, **kwargs)
            run = next(work)
            try:
                run.mark_running(name, config)
                value, info = _finish(work)
            except BaseException as e:
                run.mark_stopped(e, name)
                raise
            finally:
                work.close()
            run.mark_done(name, config, **info)
            return value

        in_entry.stage = name
        return in_entry
    return wrap


def _finish(work: StageSteps) -> tuple:
    try:
        next(work)
    except StopIteration as done:
        return done.value
    raise RuntimeError("a stage function under stage_entry yields once")


def sources_read(stages: dict, name: str) -> dict[str, str]:
    """The outside files (a given model, precomputed embeddings) that stage `name` and the
    stages it reads, transitively, recorded: a change of one makes all of them stale."""
    sources, seen, frontier = {}, set(), [name]
    while frontier:
        stage = frontier.pop()
        if stage not in seen:
            seen.add(stage)
            sources.update((stages.get(stage) or {}).get("sources") or {})
            frontier += STAGES[stage].reads
    return sources


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
