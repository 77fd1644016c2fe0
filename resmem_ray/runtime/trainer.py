"""The one Ray Train runtime: every model that trains (each task's base model, the
neighbour Transformer) goes through `fit`.

A task describes what to train as a Recipe: how to build the model and optimizer, how
to get batches on a worker, and one step's loss. The loop around it is written once:
seeding, resuming from the run's last checkpoint, DDP (`prepare_model`), epochs, a
validation pass, sums across workers, one line per epoch from rank 0, and rank 0's
checkpoint every epoch. TorchTrainer runs it over N workers with a FailureConfig, and
rerunning with the same run directory resumes from the last checkpoint (a stable run
name under the run directory, as Ray Train V2 resumes).
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from resmem_ray.errors import ResMemError
from resmem_ray.log import stage_log, verbose


@dataclass
class Recipe:
    """What to train; pickled to every worker, so its functions run there."""

    stage: str  # log prefix and checkpoint folder: RUN/ray_<stage>
    epochs: int
    seed: int
    build: Callable[[], tuple]  # () -> (model, optimizer, scheduler or None), on each worker
    batches: Callable[[str, int], Any]  # (split "train" | "val", epoch) -> iterable of batches, on each worker
    step: Callable  # (model, batch, device, training) -> (mean loss tensor, score sum, count)
    score: str = "acc"  # what the score sum over count is (metric keys train_<score>, val_<score>): acc | mse
    score_name: str = ""  # how the epoch line calls it (default: score), e.g. "next-token acc"
    seed_by_rank: bool = True  # False: every rank draws the same random numbers
    prepare: Callable[[], None] | None = None  # once per worker before building (e.g. load data)


def worker_loader(cache: dict, split: str, epoch: int, dataset: Callable[[], Any], batch_size: int):
    """A torch DataLoader over `dataset()` for this worker: built once (kept in `cache`),
    sharded across the workers by Ray Train, reshuffled every epoch for the train split."""
    import ray.train
    import ray.train.torch

    if split not in cache:
        cache[split] = ray.train.torch.prepare_data_loader(
            torch.utils.data.DataLoader(dataset(), batch_size=batch_size, shuffle=split == "train"))
    if split == "train" and ray.train.get_context().get_world_size() > 1:
        cache[split].sampler.set_epoch(epoch)
    return cache[split]


def _all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def _epoch_pass(recipe: Recipe, model, split: str, epoch: int, device, optimizer=None) -> list[float]:
    """(loss sum, score sum, count) over this worker's batches of one split."""
    training = optimizer is not None
    model.train(training)
    loss_sum = score = count = 0.0
    with torch.set_grad_enabled(training):
        for batch in recipe.batches(split, epoch):
            loss, s, n = recipe.step(model, batch, device, training)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            loss_sum, score, count = loss_sum + loss.item() * n, score + s, count + n
    return [loss_sum, score, count]


def worker_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    recipe: Recipe = config["recipe"]
    if not config["verbose"]:  # Ray Train's per-report INFO lines go to its log files
        logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(recipe.seed + (rank if recipe.seed_by_rank else 0))
    if recipe.prepare:
        recipe.prepare()
    model, optimizer, scheduler = recipe.build()
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume after a failure or an interrupted run
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            start_epoch = state["epoch"] + 1
            history = json.loads((Path(d) / "history.json").read_text())
        if rank == 0:
            stage_log(recipe.stage).info(f"resuming after epoch {start_epoch} from the last checkpoint")
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    net = model.module if hasattr(model, "module") else model
    for epoch in range(start_epoch, config.get("until_epoch") or recipe.epochs):
        t0 = time.time()
        train = _epoch_pass(recipe, model, "train", epoch, device, optimizer)
        if scheduler is not None:
            scheduler.step()
        with torch.inference_mode():
            val = _epoch_pass(recipe, model, "val", epoch, device)
        loss_sum, score, count, val_loss, val_score, val_count = _all_sum(train + val, device)
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1),
                   f"train_{recipe.score}": score / max(count, 1), "val_loss": val_loss / max(val_count, 1),
                   f"val_{recipe.score}": val_score / max(val_count, 1), "epoch_s": time.time() - t0}
        history.append(metrics)
        if rank == 0:
            # the log, not print(): Ray Train V2 patches print in workers, its lines reach the driver twice
            name = recipe.score_name or recipe.score
            stage_log(recipe.stage).info(f"epoch {epoch + 1}/{recipe.epochs}  loss {metrics['train_loss']:.4f}  "
                                         f"train {name} {metrics[f'train_{recipe.score}']:.4f}  val loss "
                                         f"{metrics['val_loss']:.4f}  val {name} {metrics[f'val_{recipe.score}']:.4f}"
                                         f"  ({metrics['epoch_s']:.1f}s)")
            with tempfile.TemporaryDirectory() as d:
                state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
                if scheduler is not None:
                    state["scheduler"] = scheduler.state_dict()
                torch.save(state, Path(d) / "state.pt")
                (Path(d) / "history.json").write_text(json.dumps(history))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def keep_checkpoints_to_resume(run, stage: str, config: dict, epochs: int) -> None:
    """Before `stage`'s entry opens: keep its checkpoints (Ray Train resumes from them)
    only for an interrupted or stopped-early run (of `epochs`) with the same config, as
    its entry recorded; anything else trains afresh."""
    previous = run.manifest()["stages"].get(stage, {})
    unfinished = previous.get("status") in ("running", "interrupted", "failed") \
        or previous.get("epochs_done", epochs) < epochs
    if not unfinished or previous.get("config") != config:
        run.delete(f"ray_{stage}")  # forget old checkpoints: start from scratch


def _fit_in_a_thread(trainer):
    """trainer.fit() in a thread of its own: in the main thread Ray Train installs a SIGINT
    handler that ends the process with no word; here Ctrl-C stays a KeyboardInterrupt
    (the workers end with the driver)."""
    out: dict = {}

    def target():
        try:
            out["result"] = trainer.fit()
        except BaseException as e:  # handed to the caller's thread
            out["error"] = e

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in out:
        raise out["error"]
    return out["result"]


def ordered_ingest():
    """Ray Train's ingest options with Ray Data's blocks kept in order: every rank then gets
    the same rows in the same order, run after run. By default blocks go out as their tasks
    finish, so a busy CPU changes which rank trains on which texts."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def fit(run, recipe: Recipe, num_workers: int, cpus_per_worker: float, use_gpu: bool = False,
        datasets: dict | None = None, until_epoch: int | None = None) -> tuple[dict, list[dict]]:
    """Fit a TorchTrainer over `num_workers`; (final state, per-epoch history) from its
    last checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, filesystem = run.train_storage()  # a URI run keeps its checkpoints there
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"recipe": recipe, "until_epoch": until_epoch, "verbose": verbose()},
        datasets=datasets,
        dataset_config=ordered_ingest() if datasets else None,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        # A stable name under the run directory: rerunning resumes from its last checkpoint.
        run_config=RunConfig(name=f"ray_{recipe.stage}", storage_path=storage_path, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=2),
                             logging_config=None if verbose() else ray.LoggingConfig(log_level="WARNING")),
    )
    result = _fit_in_a_thread(trainer)
    if result.checkpoint is None:
        raise ResMemError(f"{recipe.stage}: training produced no checkpoint ({recipe.epochs} epochs)")
    with result.checkpoint.as_directory() as d:  # on the host: a GPU worker's tensors, for a driver without one
        state = torch.load(Path(d) / "state.pt", weights_only=True, map_location="cpu")
        history = json.loads((Path(d) / "history.json").read_text())
    return state, history


def chance_warning(history: list[dict], num_classes: int, factor: float = 1.5) -> str | None:
    """One line when a classifier did not learn: its last epoch's train accuracy (`train_acc`
    of the history) is at most `factor` x chance, 1 / num_classes. None otherwise, and for
    histories without train_acc (regression, language models)."""
    if not history or "train_acc" not in history[-1] or num_classes < 2:
        return None
    acc, chance = history[-1]["train_acc"], 1.0 / num_classes
    if acc > factor * chance:
        return None
    return (f"the base model did not learn: final train accuracy {100 * acc:.2f}% vs chance "
            f"{100 * chance:.2f}% (1/{num_classes}), within {factor:g}x of chance; ResMem and the "
            "baselines built on its probabilities correct a near-chance model")
