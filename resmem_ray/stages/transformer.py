"""Stage transformer: train the neighbour Transformer (tasks/neighbour_model.py) with the
one Ray Train runtime, on the train split, each example answered by its k nearest
*other* training examples (its own memory row is dropped, or it would learn to copy the
1-NN label), and checked on val each epoch."""

from __future__ import annotations

import json

import torch

from resmem_ray.core.knn import prepare_queries
from resmem_ray.errors import ResMemError
from resmem_ray.log import stage_log
from resmem_ray.runtime import trainer
from resmem_ray.runtime.shards import ShardedMemory
from resmem_ray.schema import Config
from resmem_ray.store.artifacts import read_index_manifest, read_memory_split, read_split
from resmem_ray.store.files import atomic_dir, file_hashes
from resmem_ray.store.rundir import RunDir, StageSteps, stage_entry
from resmem_ray.tasks.neighbour_model import build, model_inputs, neighbour_inputs

log = stage_log("transformer")

INPUTS = ("query", "neighbours", "labels", "distances")


def _lookup_inputs(cfg: Config, run: RunDir, manifest: dict, needed_by: str, splits: dict[str, bool]):
    """neighbour_inputs for each split; `splits` maps a split to whether it is the memory itself."""
    s = cfg.neighbour_transformer
    if s.k + 1 > manifest["rows"]:
        raise ResMemError(f"config key neighbour_transformer.k: {s.k} neighbours need a memory of more "
                          f"than {s.k} rows ({manifest['rows']})")
    memory = read_memory_split(run, needed_by, ("id", "embedding"))  # memorized rows included
    memory_embeddings = prepare_queries(memory["embedding"], manifest["distance"], manifest["normalize"])
    out = {}
    with ShardedMemory(run.index, manifest, cfg.index) as lookup:
        for split, is_memory in splits.items():
            rows = read_split(run, split, needed_by, ("id", "label", "embedding"))
            queries = prepare_queries(rows["embedding"], manifest["distance"], manifest["normalize"])
            nb = lookup.search_batches(queries, s.k + 1 if is_memory else s.k, cfg.evaluate.batch_size)
            out[split] = neighbour_inputs(queries, rows["label"], rows["id"] if is_memory else None, nb,
                                          memory_embeddings, memory["id"], s.k)
    return out


def recipe(cfg: Config, meta: dict, data_ref) -> trainer.Recipe:
    """The Transformer as a Recipe: the neighbour tables travel through the object store
    (read-only there: torch.tensor copies what as_tensor would only wrap, with a warning)."""
    import ray

    s = cfg.neighbour_transformer
    loaded: dict = {}

    def prepare():
        loaded["data"] = ray.get(data_ref)

    def build_all():
        model = build(meta)
        optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=1e-4)
        return model, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.epochs)

    def batches(split: str, epoch: int):
        data = loaded["data"][split]
        if split == "val":  # plain slices: no DataLoader, no draw from the random stream
            return ([torch.tensor(data[key][i:i + 1024]) for key in (*INPUTS, "target")]
                    for i in range(0, len(data["target"]), 1024))
        return trainer.worker_loader(
            loaded, split, epoch,
            lambda: torch.utils.data.TensorDataset(*model_inputs(data, "cpu"), torch.tensor(data["target"])),
            s.batch_size)

    def step(model, batch, device, training):
        *inputs, target = [t.to(device) for t in batch]
        logits = model(*inputs)
        return (torch.nn.functional.cross_entropy(logits, target), (logits.argmax(1) == target).sum().item(),
                len(target))

    return trainer.Recipe(stage="transformer", epochs=s.epochs, seed=cfg.seed, build=build_all, batches=batches,
                          step=step, prepare=prepare)


@stage_entry("transformer")
def train_neighbour_transformer(cfg: Config) -> StageSteps:
    import ray

    run = RunDir(cfg.run_dir)
    manifest = read_index_manifest(run, needed_by="transformer")
    data = _lookup_inputs(cfg, run, manifest, "transformer", {"train": True, "val": False})
    num_classes = int(max(data["train"]["target"].max(), data["train"]["labels"].max()) + 1)
    meta = {"dim": manifest["dim"], "num_classes": num_classes, "settings": cfg.neighbour_transformer.__dict__,
            "distance": manifest["distance"], "normalize": manifest["normalize"]}
    s = cfg.neighbour_transformer
    trainer.keep_checkpoints_to_resume(run, "transformer", cfg.to_dict(), s.epochs)
    yield run  # the entry opens: running
    log.info(f"{len(data['train']['query'])} train queries x {s.k} neighbours, "
             f"{s.epochs} epochs on {s.num_workers} Ray Train worker(s)")
    state, history = trainer.fit(run, recipe(cfg, meta, ray.put(data)), s.num_workers, s.cpus_per_worker)
    with atomic_dir(run.transformer) as tmp:
        torch.save(state["model"], tmp / "model.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "val_acc": history[-1]["val_acc"]}, indent=2))
    return history[-1], {"files": file_hashes(run.transformer), "val_acc": history[-1]["val_acc"],
                         "epochs_done": len(history)}

