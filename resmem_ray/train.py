"""Stage 1, train: the base model with Ray Train (TorchTrainer, DDP over N workers).

Each worker loads the dataset itself (shared storage on a cluster), takes its shard
through a DistributedSampler, and reports per-epoch metrics; rank 0 attaches a
checkpoint. A rerun with the same run directory resumes from the last checkpoint.
The final weights are copied to RUN/model/ with their metadata and hash.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from resmem_ray.config import TEXT_MODELS, Config
from resmem_ray.data import SplitDataset, augment_batch, load_splits, normalize
from resmem_ray.errors import ResMemError
from resmem_ray.models import EmbedHead, build_model
from resmem_ray.rundir import RunDir, atomic_dir, file_hashes, verify_hashes


def _evaluate(model, loader, dataset: str, device) -> tuple[float, float]:
    """(correct, count) on this worker's shard of `loader`."""
    model.eval()
    correct = count = 0
    with torch.inference_mode():
        for images, labels, _ in loader:
            logits = model(normalize(images, dataset).to(device))
            correct += (logits.argmax(1).cpu() == labels).sum().item()
            count += len(labels)
    return correct, count


def _all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg: Config = loop_config["cfg"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.seed + rank)
    splits, info = load_splits(cfg.data, cfg.seed)
    model = build_model(cfg.model, info.in_channels, info.num_classes)

    def loader(split: str, shuffle: bool):
        dl = torch.utils.data.DataLoader(SplitDataset(splits[split], info.image_size),
                                         batch_size=cfg.train.batch_size, shuffle=shuffle)
        return ray.train.torch.prepare_data_loader(dl)

    train_loader, val_loader = loader("train", True), loader("val", False)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume after a failure or an interrupted run
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = state["epoch"] + 1
            history = json.loads((Path(d) / "history.json").read_text())
        if rank == 0:
            sys.stdout.write(f"[train] resuming after epoch {start_epoch} from the last checkpoint\n")
            sys.stdout.flush()
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    for epoch in range(start_epoch, loop_config.get("until_epoch") or cfg.train.epochs):
        t0 = time.time()
        if ctx.get_world_size() > 1:
            train_loader.sampler.set_epoch(epoch)
        model.train()
        loss_sum = correct = count = 0.0
        for images, labels, _ in train_loader:
            x = normalize(images, cfg.data.name)
            if cfg.data.augment:
                x = augment_batch(x)
            x, labels = x.to(device), labels.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            count += len(labels)
        scheduler.step()
        val_correct, val_count = _evaluate(model, val_loader, cfg.data.name, device)
        loss_sum, correct, count, val_correct, val_count = _all_sum(
            [loss_sum, correct, count, val_correct, val_count], device)
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / count, "train_acc": correct / count,
                   "val_acc": val_correct / max(val_count, 1), "epoch_s": time.time() - t0}
        history.append(metrics)
        if rank == 0:
            # not print(): Ray Train V2 patches it in workers and the line reaches the driver twice
            sys.stdout.write(f"[train] epoch {epoch + 1}/{cfg.train.epochs}  loss {metrics['train_loss']:.4f}  "
                             f"train acc {metrics['train_acc']:.4f}  val acc {metrics['val_acc']:.4f}  "
                             f"({metrics['epoch_s']:.1f}s)\n")
            sys.stdout.flush()
            with tempfile.TemporaryDirectory() as d:
                net = model.module if hasattr(model, "module") else model
                torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch}, Path(d) / "state.pt")
                (Path(d) / "history.json").write_text(json.dumps(history))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def start_training(run: RunDir, cfg: Config) -> None:
    """Mark the train stage running. Resume only an interrupted or stopped-early run of
    the same config (Ray Train finds its checkpoints); anything else trains afresh."""
    previous = run.manifest()["stages"].get("train", {})
    unfinished = previous.get("status") == "running" or previous.get("epochs_done", cfg.train.epochs) < cfg.train.epochs
    if not unfinished or previous.get("config") != cfg.to_dict():
        clear_checkpoints(run)
    run.mark_running("train", cfg.to_dict())


def fit_base_model(run: RunDir, cfg: Config, loop, loop_config: dict, datasets: dict | None = None
                   ) -> tuple[dict, list[dict]]:
    """Fit a TorchTrainer over train.num_workers; (final state, per-epoch history) from its
    last checkpoint (state.pt + history.json, written by the loop's rank 0)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, filesystem = run.train_storage()  # a URI run keeps its checkpoints there
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        # A stable name under the run directory: rerunning resumes from its last checkpoint.
        run_config=RunConfig(name="ray_train", storage_path=storage_path, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise ResMemError(f"training produced no checkpoint (train.epochs={cfg.train.epochs})")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", weights_only=True)
        history = json.loads((Path(d) / "history.json").read_text())
    return state, history


def train(cfg: Config, until_epoch: int | None = None) -> dict:
    """Train (or resume) the base model; `until_epoch` stops early with the schedule of
    train.epochs, and a later call with the same config continues from there (sweeps:
    vision models only)."""
    if cfg.model.name in TEXT_MODELS:
        from resmem_ray.text import train_text

        return train_text(cfg)
    run = RunDir(cfg.run_dir)
    _, info = load_splits(cfg.data, cfg.seed)  # fail here, not in a worker, on bad data
    start_training(run, cfg)
    state, history = fit_base_model(run, cfg, train_loop, {"cfg": cfg, "until_epoch": until_epoch})
    with atomic_dir(run.model) as tmp:
        torch.save(state["model"], tmp / "model.pt")
        probe = build_model(cfg.model, info.in_channels, info.num_classes)
        meta = {"model": cfg.model.__dict__, "dataset": cfg.data.name, "num_classes": info.num_classes,
                "in_channels": info.in_channels, "image_size": info.image_size,
                "embedding_dim": probe.embedding_dim}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        (tmp / "history.json").write_text(json.dumps(history, indent=2))
    run.mark_done("train", cfg.to_dict(), files=file_hashes(run.model), history=history,
                  epochs_done=len(history))
    return history[-1]


def load_model(run: RunDir) -> tuple[EmbedHead, dict]:
    """The trained model of a run, checked against the manifest."""
    from resmem_ray.config import ModelConfig

    entry = run.stage_output("train", needed_by="embed")
    verify_hashes(run.model, entry["files"], "trained model")
    meta = json.loads((run.model / "meta.json").read_text())
    model = build_model(ModelConfig(**meta["model"]), meta["in_channels"], meta["num_classes"])
    model.load_state_dict(torch.load(run.model / "model.pt", weights_only=True))
    return model.eval(), meta


def clear_checkpoints(run: RunDir) -> None:
    """Forget Ray Train's checkpoints so the next `train` starts from scratch."""
    run.delete("ray_train")
