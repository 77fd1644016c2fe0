"""Stage transformer: the memorization study's Transformer over a query's neighbours.

A small Transformer encoder reads one token for the query (its embedding) and one per
nearest memory row (embedding + label + distance + rank) and predicts the query's class
from the query token. It is trained with Ray Train on the train split, each example
answered by its k nearest *other* training examples (its own memory row is dropped), and
checked on val; evaluate reports it beside k-NN and ResMem.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from resmem_ray.config import Config, NeighbourTransformerConfig
from resmem_ray.embed import read_split
from resmem_ray.errors import ResMemError
from resmem_ray.index import prepare_queries, read_index_manifest
from resmem_ray.lookup import ShardedMemory
from resmem_ray.rundir import RunDir, atomic_dir, file_hashes, verify_hashes


class NeighbourTransformer(nn.Module):
    def __init__(self, dim: int, num_classes: int, k: int, d_model: int, layers: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(dim, d_model)
        self.label = nn.Embedding(num_classes + 1, d_model)  # the last entry marks the query token
        self.rank = nn.Embedding(k + 1, d_model)  # 0: query, 1..k: neighbour rank
        self.distance = nn.Linear(1, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, num_classes)
        self.num_classes = num_classes

    def forward(self, query, neighbours, labels, distances):
        """query (B, d), neighbours (B, k, d), labels (B, k) long, distances (B, k) -> logits (B, C)."""
        b, k, _ = neighbours.shape
        q = self.embed(query)[:, None] + self.label.weight[self.num_classes] + self.rank.weight[0]
        n = (self.embed(neighbours) + self.label(labels) + self.distance(distances[..., None])
             + self.rank(torch.arange(1, k + 1, device=labels.device)))
        return self.out(self.encoder(torch.cat([q, n], dim=1))[:, 0])


def build(meta: dict) -> NeighbourTransformer:
    s = meta["settings"]
    return NeighbourTransformer(meta["dim"], meta["num_classes"], s["k"], s["d_model"], s["layers"], s["heads"])


def neighbour_inputs(queries: np.ndarray, labels: np.ndarray, ids: np.ndarray | None, nb,
                     memory_embeddings: np.ndarray, memory_ids: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Model inputs from a lookup `nb` (at least k + 1 neighbours when `ids` is given):
    with `ids` (the queries are memory rows) each query's own row is dropped."""
    if ids is not None:
        keep = nb.ids != ids[:, None]
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # first k rows that are not the query
        take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
        nb_ids, nb_labels, nb_dist = take(nb.ids), take(nb.labels), take(nb.distances)
    else:
        nb_ids, nb_labels, nb_dist = nb.ids[:, :k], nb.labels[:, :k], nb.distances[:, :k]
    rows = np.searchsorted(memory_ids, nb_ids)
    return {"query": queries.astype(np.float32), "neighbours": memory_embeddings[rows].astype(np.float32),
            "labels": nb_labels.astype(np.int64), "distances": nb_dist.astype(np.float32),
            "target": labels.astype(np.int64)}


def _tensors(batch: dict[str, np.ndarray], device):
    return [torch.tensor(batch[key], device=device) for key in ("query", "neighbours", "labels", "distances")]


def predict(model: NeighbourTransformer, inputs: dict[str, np.ndarray], batch_size: int = 1024) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(inputs["query"]), batch_size):
            part = {key: value[start:start + batch_size] for key, value in inputs.items()}
            out.append(model(*_tensors(part, "cpu")).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch

    settings: NeighbourTransformerConfig = loop_config["settings"]
    data = ray.get(loop_config["data"])
    ctx = ray.train.get_context()
    torch.manual_seed(loop_config["seed"] + ctx.get_world_rank())
    model = ray.train.torch.prepare_model(build(loop_config["meta"]))
    train = torch.utils.data.TensorDataset(*_tensors(data["train"], "cpu"),
                                           torch.as_tensor(data["train"]["target"]))
    loader = ray.train.torch.prepare_data_loader(
        torch.utils.data.DataLoader(train, batch_size=settings.batch_size, shuffle=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    device = ray.train.torch.get_device()
    net = model.module if hasattr(model, "module") else model
    for epoch in range(settings.epochs):
        if ctx.get_world_size() > 1:
            loader.sampler.set_epoch(epoch)
        model.train()
        loss_sum = count = 0.0
        for *inputs, target in loader:
            loss = F.cross_entropy(model(*[t.to(device) for t in inputs]), target.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, count = loss_sum + loss.item() * len(target), count + len(target)
        scheduler.step()
        net_cpu = net.to("cpu")
        val_acc = float((predict(net_cpu, data["val"]) == data["val"]["target"]).mean())
        net.to(device)
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1), "val_acc": val_acc}
        last = epoch + 1 == settings.epochs
        if ctx.get_world_rank() == 0:
            sys.stdout.write(f"[transformer] epoch {epoch + 1}/{settings.epochs}  loss {metrics['train_loss']:.4f}"
                             f"  val acc {val_acc:.4f}\n")
            sys.stdout.flush()
        if ctx.get_world_rank() == 0 and last:
            with tempfile.TemporaryDirectory() as d:
                torch.save(net.state_dict(), Path(d) / "model.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def _lookup_inputs(cfg: Config, run: RunDir, manifest: dict, needed_by: str, splits: dict[str, bool]):
    """neighbour_inputs for each split; `splits` maps a split to whether it is the memory itself."""
    s = cfg.neighbour_transformer
    if s.k + 1 > manifest["rows"]:
        raise ResMemError(f"config key neighbour_transformer.k: {s.k} neighbours need a memory of more "
                          f"than {s.k} rows ({manifest['rows']})")
    memory = read_split(run, "train", needed_by, ("id", "embedding"))
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


def train_neighbour_transformer(cfg: Config) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run = RunDir(cfg.run_dir)
    manifest = read_index_manifest(run, needed_by="transformer")
    data = _lookup_inputs(cfg, run, manifest, "transformer", {"train": True, "val": False})
    num_classes = int(max(data["train"]["target"].max(), data["train"]["labels"].max()) + 1)
    meta = {"dim": manifest["dim"], "num_classes": num_classes, "settings": cfg.neighbour_transformer.__dict__,
            "distance": manifest["distance"], "normalize": manifest["normalize"]}
    run.mark_running("transformer", cfg.to_dict())
    s = cfg.neighbour_transformer
    print(f"[transformer] {len(data['train']['query'])} train queries x {s.k} neighbours, "
          f"{s.epochs} epochs on {s.num_workers} Ray Train worker(s)", flush=True)
    storage_path, filesystem = run.train_storage()  # shared storage on a cluster (a URI run dir)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"settings": s, "meta": meta, "seed": cfg.seed, "data": ray.put(data)},
        scaling_config=ScalingConfig(num_workers=s.num_workers, resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=RunConfig(name="ray_train_transformer", storage_path=storage_path, storage_filesystem=filesystem))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d, atomic_dir(run.transformer) as tmp:
        (tmp / "model.pt").write_bytes((Path(d) / "model.pt").read_bytes())
        (tmp / "meta.json").write_text(json.dumps({**meta, "val_acc": result.metrics["val_acc"]}, indent=2))
    run.mark_done("transformer", cfg.to_dict(), files=file_hashes(run.transformer),
                  val_acc=result.metrics["val_acc"])
    return result.metrics


def load_transformer(run: RunDir, needed_by: str) -> tuple[NeighbourTransformer, dict]:
    entry = run.stage_output("transformer", needed_by)
    verify_hashes(run.transformer, entry["files"], "neighbour Transformer")
    meta = json.loads((run.transformer / "meta.json").read_text())
    model = build(meta)
    model.load_state_dict(torch.load(run.transformer / "model.pt", weights_only=True))
    return model.eval(), meta


def transformer_predictions(cfg: Config, run: RunDir, queries: np.ndarray, labels: np.ndarray, nb) -> np.ndarray:
    """The trained Transformer's class for each (already prepared) query, from its lookup `nb`."""
    model, meta = load_transformer(run, needed_by="evaluate")
    k = meta["settings"]["k"]
    if nb.ids.shape[1] < k:
        raise ResMemError(f"the neighbour Transformer reads {k} neighbours, the lookup returned {nb.ids.shape[1]}")
    memory = read_split(run, "train", "evaluate", ("id", "embedding"))
    memory_embeddings = prepare_queries(memory["embedding"], meta["distance"], meta["normalize"])
    inputs = neighbour_inputs(queries, labels, None, nb, memory_embeddings, memory["id"], k)
    return predict(model, inputs)
