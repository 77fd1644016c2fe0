"""`resmem status RUN`: what a run directory holds, as a table: each stage's status
(done, running, failed, interrupted, or stale and why), how long it took, and the size
of its outputs. Compared with the run's own config (that of its last finished stage),
with overrides applied to it, or with --config and overrides: what `resmem run` would
rerun with them."""

from __future__ import annotations

import time

from resmem_ray.config import apply_overrides, config_from_dict, load_config
from resmem_ray.errors import ResMemError
from resmem_ray.pipeline import enabled, stage_keys
from resmem_ray.stage_table import STAGES
from resmem_ray.store.rundir import RunDir, pick


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def status_rows(run: RunDir, cfg) -> list[dict]:
    stages = run.manifest().get("stages", {})
    config = cfg.to_dict()
    rows = []
    for name, stage in STAGES.items():
        entry = stages.get(name)
        if not stage.folder or (entry is None and not enabled(stage, cfg)):
            continue
        status, why = (entry or {}).get("status", "not run"), (entry or {}).get("error", "")
        if status == "done":
            keys = stage_keys(name, cfg)
            reason = run.stale_reason(name, config, keys)
            if reason == "config changed":
                old, new = pick(entry.get("config", {}), keys), pick(config, keys)
                reason += ": " + ", ".join(k for k in keys if old[k] != new[k])
            status, why = ("stale", reason) if reason else ("done", "")
        files = [run.root / stage.folder / rel for rel in (entry or {}).get("outputs", {})]
        size = sum(p.stat().st_size for p in files if p.is_file())
        seconds = (entry or {}).get("seconds")
        if status == "running" and entry.get("started_at"):
            seconds = time.time() - entry["started_at"]
        rows.append({"stage": name, "status": status, "why": why, "seconds": seconds, "files": len(files),
                     "bytes": size})
    return rows


def print_status(run_dir: str, config_path: str | None, overrides: tuple[str, ...]) -> None:
    run = RunDir(run_dir)
    if not run.is_run_dir():
        raise ResMemError(f"{run.root} is not a resmem run directory (no manifest.json)")
    manifest = run.manifest()
    if config_path:
        cfg = load_config(config_path, (*overrides, f"run_dir={run_dir}"))
    elif "config" in manifest:  # the config of the run's last finished stage, with the overrides
        cfg = config_from_dict(apply_overrides(manifest["config"], overrides))
    else:
        raise ResMemError(f"{run.manifest_path} records no config yet: pass --config")
    lines = [f"run directory {run.location}", "", "| stage | status | why | duration | outputs |",
             "| --- | --- | --- | ---: | ---: |"]
    for r in status_rows(run, cfg):
        duration = "" if r["seconds"] is None else f"{r['seconds']:.1f} s"
        outputs = f"{r['files']} files, {_size(r['bytes'])}" if r["files"] else ""
        lines.append(f"| {r['stage']} | {r['status']} | {r['why']} | {duration} | {outputs} |")
    print("\n".join(lines))
