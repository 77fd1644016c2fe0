"""The memorization study's Transformer over a query and its k nearest neighbours.

A small Transformer encoder reads one token for the query (its embedding) and one per
nearest memory row (embedding + label + distance + rank) and predicts the query's class
from the query token. The `transformer` stage trains it (stages/transformer.py); the
classification tasks report it beside k-NN and ResMem.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from resmem_ray.core.knn import prepare_queries
from resmem_ray.errors import ResMemError
from resmem_ray.store.artifacts import read_memory_split
from resmem_ray.store.files import verify_hashes
from resmem_ray.store.rundir import RunDir


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


def model_inputs(batch: dict[str, np.ndarray], device):
    return [torch.tensor(batch[key], device=device) for key in ("query", "neighbours", "labels", "distances")]


def predict(model: NeighbourTransformer, inputs: dict[str, np.ndarray], batch_size: int = 1024) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(inputs["query"]), batch_size):
            part = {key: value[start:start + batch_size] for key, value in inputs.items()}
            out.append(model(*model_inputs(part, "cpu")).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def load_transformer(run: RunDir, needed_by: str) -> tuple[NeighbourTransformer, dict]:
    entry = run.stage_output("transformer", needed_by)
    verify_hashes(run.transformer, entry["files"], "neighbour Transformer")
    meta = json.loads((run.transformer / "meta.json").read_text())
    model = build(meta)
    model.load_state_dict(torch.load(run.transformer / "model.pt", weights_only=True))
    return model.eval(), meta


def transformer_predictor(run: RunDir):
    """The trained Transformer's class for each (already prepared) query from its lookup
    `nb`, as a function of (queries, labels, nb): the model and the memory's embeddings
    (the neighbours' inputs) are loaded once."""
    model, meta = load_transformer(run, needed_by="evaluate")
    k = meta["settings"]["k"]
    memory = read_memory_split(run, "evaluate", ("id", "embedding"))
    memory_embeddings = prepare_queries(memory["embedding"], meta["distance"], meta["normalize"])

    def predictions(queries: np.ndarray, labels: np.ndarray, nb) -> np.ndarray:
        if nb.ids.shape[1] < k:
            raise ResMemError(f"the neighbour Transformer reads {k} neighbours, the lookup returned {nb.ids.shape[1]}")
        return predict(model, neighbour_inputs(queries, labels, None, nb, memory_embeddings, memory["id"], k))
    return predictions
