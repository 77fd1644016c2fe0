"""`resmem run`: the stage table's pipeline stages in order, skipping the stages whose
outputs are current.

What a stage's outputs depend on is derived, not listed: the config keys that name it
(schema.py), the keys its task declares for it (tasks/registry.py), and those of every
stage it reads that takes part in the run, transitively; resource keys never count, nor
do the train.* keys for a model trained elsewhere (model.source checkpoint or
precomputed), which nothing trains.
"""

from __future__ import annotations

import time

from resmem_ray.errors import ResMemError
from resmem_ray.log import logger
from resmem_ray.schema import RULES, Config, get_key
from resmem_ray.stage_table import STAGES, Stage
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.registry import task_for


def enabled(stage: Stage, cfg: Config) -> bool:
    """Whether `resmem run` runs this stage with this config."""
    if not stage.in_pipeline:
        return False
    return stage.enabled_by is None or bool(get_key(cfg, stage.enabled_by))


def _expand(keys) -> list[str]:
    """Declared keys (sections or leaves) as the schema's non-resource leaf keys."""
    return [leaf for leaf, rules in RULES.items() if not rules.resource
            and any(leaf == k or leaf.startswith(k + ".") for k in keys)]


def stage_keys(name: str, cfg: Config) -> list[str]:
    """The config keys the outputs of stage `name` follow from, with this config's task."""
    task = task_for(cfg)
    keys, seen, frontier = [], set(), [name]
    while frontier:
        stage = STAGES[frontier.pop()]
        if stage.name in seen:
            continue
        seen.add(stage.name)
        keys += [key for key, rules in RULES.items() if stage.name in rules.stages]
        keys += task.stage_reads(cfg).get(stage.name, ())
        frontier += [r for r in stage.reads if enabled(STAGES[r], cfg)]
    given = cfg.model.source != "trained"
    return [key for key in _expand(keys) if not (given and key.startswith("train."))]


def run_stage(name: str, cfg: Config, **options):
    """One stage, inside its manifest entry (store/rundir.py: stage_entry); a stage with
    outputs that returns without its entry done is an error, not a silent rerun later."""
    t0 = time.time()
    logger.info(f"== {name} ==")
    stage = STAGES[name]
    out = stage.run(cfg, **options)
    if stage.folder and RunDir(cfg.run_dir).manifest()["stages"].get(name, {}).get("status") != "done":
        raise ResMemError(f"stage {name} returned without recording its outputs in the manifest")
    logger.info(f"== {name} done in {time.time() - t0:.1f}s ==")
    return out


def run_pipeline(cfg: Config) -> None:
    """The pipeline's stages in order; a stage whose config keys, output hashes and inputs
    still match the manifest is skipped, so a rerun continues where a run stopped."""
    run = RunDir(cfg.run_dir)
    config = cfg.to_dict()
    for stage in STAGES.values():
        if not enabled(stage, cfg):
            continue
        reason = run.stale_reason(stage.name, config, stage_keys(stage.name, cfg))
        if reason is None:
            logger.info(f"== {stage.name}: finished, outputs match the manifest: skipped ==")
        else:
            run_stage(stage.name, cfg)
