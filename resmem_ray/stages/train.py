"""Stage train: the task's base model, trained by the one Ray Train runtime
(runtime/trainer.py: TorchTrainer, DDP over train.num_workers, resume from the last
checkpoint). The final weights go to RUN/model/ with their metadata and hash.

A model trained elsewhere (model.source=checkpoint, model.path) is checked and written to
RUN/model/ in the same form instead, so every later stage reads it as its own; the entry
records the given file's fingerprint, and a changed file makes train and all after it
stale. With model.source=precomputed the task writes what stands for the model (its
meta.json) from the precomputed files."""

from __future__ import annotations

import json

from resmem_ray.log import stage_log
from resmem_ray.runtime import trainer
from resmem_ray.schema import Config
from resmem_ray.store.files import atomic_dir, file_hashes
from resmem_ray.store.remote import source_digest
from resmem_ray.store.rundir import RunDir, StageSteps, stage_entry
from resmem_ray.tasks.registry import task_for

log = stage_log("train")


@stage_entry("train")
def train(cfg: Config, until_epoch: int | None = None) -> StageSteps:
    """Train (or resume) the base model; `until_epoch` stops early with the schedule of
    train.epochs, and a later call with the same config continues from there (sweeps)."""
    task = task_for(cfg)
    run = RunDir(cfg.run_dir)
    splits, info = task.load_splits(cfg)  # fail here, not in a worker, on bad data
    if cfg.model.source != "trained":
        given = task.load_given(cfg, splits, info)  # every check before the entry opens
        yield run
        with atomic_dir(run.model) as tmp:
            meta = task.save_given(cfg, run, tmp, given, splits, info)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        log.info(f"the {cfg.model.source} model of {cfg.model.path}: {meta['embedding_dim']}-dim embeddings, "
                 f"{meta['num_classes']} outputs (nothing trained)")
        return meta, {"files": file_hashes(run.model), "sources": {cfg.model.path: source_digest(cfg.model.path)}}
    recipe, datasets = task.training(cfg, run, splits, info)
    trainer.keep_checkpoints_to_resume(run, "train", cfg.to_dict(), cfg.train.epochs)
    yield run  # the entry opens: running
    t = cfg.train
    state, history = trainer.fit(run, recipe, t.num_workers, t.cpus_per_worker, t.use_gpu, datasets, until_epoch)
    with atomic_dir(run.model) as tmp:
        meta = task.save_model(cfg, run, tmp, state, splits, info)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        (tmp / "history.json").write_text(json.dumps(history, indent=2))
    warning = trainer.chance_warning(history, meta.get("num_classes", 0))
    if warning:
        log.info(f"warning: {warning}")
    return history[-1], {"files": file_hashes(run.model), "history": history, "epochs_done": len(history)}

