"""The Ray Serve side of `resmem serve`: the memory and the model replicas.

  Memory  one replica: the run's shards, searched in the replica (or, with
          serve.shard_actors, in shard actors: ShardedMemory, as evaluate searches them),
          plus the write shard, the rows POST /memorize added; each batch of queries gets
          the global top-k over both. Added rows are persisted (add_shard: files, then the
          index manifest) before the call returns, so the next query sees them and a
          restart keeps them.
  Model   serve.replicas replicas: embed and score a batch of requests, one memory
          lookup per batch. What embedding and scoring mean is the task's
          (tasks/registry.py: serve_encoder, serve_answers); it is handed in, not imported.

The HTTP ingress that checks requests, gathers them into batches (serve.batch) and calls
these is stages/serve.py.
"""

from __future__ import annotations

import threading

import numpy as np
from ray import serve

from resmem_ray.core.knn import (Neighbours, merge_topk, pack_residuals, prepare_queries, search_shard,
                                 unpack_residuals)
from resmem_ray.runtime.shards import LocalShards, ShardedMemory, add_shard
from resmem_ray.schema import Config
from resmem_ray.store.artifacts import check_k, load_shard, read_index_manifest
from resmem_ray.store.rundir import RunDir

SERVE_SOURCE = "POST /memorize"  # manifest["memorized"]'s source of rows added by `resmem serve`


@serve.deployment(num_replicas=1, max_ongoing_requests=64)
class Memory:
    def __init__(self, run_dir: str, cfg: Config):
        self.run = RunDir(run_dir)
        self.manifest = read_index_manifest(self.run, needed_by="serve")
        write_shard = self.manifest.get("serve_shard")
        static = [s for s in self.manifest["shards"] if s["shard"] != write_shard]
        self.static_rows = sum(s["rows"] for s in static)
        if cfg.serve.shard_actors:
            self.shards = ShardedMemory(self.run.index, {**self.manifest, "shards": static, "rows": self.static_rows},
                                        cfg.index)
        else:  # in this replica: one hop less per batch, for a memory that fits one process
            self.shards = LocalShards(self.run.index, static, self.manifest["distance"], cfg.index)
        self.lock = threading.Lock()
        self.write = None  # (FAISS index, rows, embeddings) of the write shard
        if write_shard is not None:
            entry = next(s for s in self.manifest["shards"] if s["shard"] == write_shard)
            index, rows = load_shard(self.run.index, entry)
            self.write = (index, rows, index.reconstruct_n(0, index.ntotal))

    def ready(self) -> dict:
        return {"rows": self.manifest["rows"], "shards": len(self.manifest["shards"])}

    def search(self, queries: np.ndarray, k: int) -> Neighbours:
        write = self.write  # one consistent snapshot; add() swaps it whole
        rows = self.static_rows + (len(write[1]["ids"]) if write else 0)
        check_k(k, rows)
        parts = [self.shards.search(queries, min(k, self.static_rows)).as_part()]
        if write:
            parts.append(search_shard(write[0], write[1], queries, k, self.manifest["distance"]))
        return merge_topk(parts, k)

    def add(self, embeddings: np.ndarray, labels: np.ndarray, residual_rows: np.ndarray,
            memorized: dict[str, np.ndarray]) -> list[int]:
        """Persist rows in the write shard (rewritten whole as a new shard number) and their
        embedding rows (`memorized`, without ids), then make them searchable; their new ids."""
        with self.lock:
            m = self.manifest
            ids = m["next_id"] + np.arange(len(labels), dtype=np.int64)
            old = self.write or (None, {"ids": ids[:0], "labels": labels[:0], "residuals": residual_rows[:0]},
                                 embeddings[:0])
            residuals = np.concatenate([unpack_residuals(old[1], slice(None)), residual_rows])
            # stored as the memory stores them: answers now equal those after a reload
            rows = {"ids": np.concatenate([old[1]["ids"], ids]), "labels": np.concatenate([old[1]["labels"], labels]),
                    **pack_residuals(residuals, m["residual_dtype"])}
            emb = np.concatenate([old[2], embeddings]).astype(np.float32)
            record = {"source": SERVE_SOURCE, "rows": int(len(ids)), "first_id": int(ids[0])}
            manifest, index = add_shard(self.run, m, emb, rows["ids"], rows["labels"], residuals, record,
                                        {"id": ids, **memorized}, write_shard=True)
            self.manifest, self.write = manifest, (index, rows, emb)
            return ids.tolist()


@serve.deployment(max_ongoing_requests=128)
class Model:
    def __init__(self, task, run_dir: str, cfg: Config, memory, threads: int):
        self.task, self.cfg, self.memory = task, cfg, memory
        self.encode = task.serve_encoder(run_dir, threads)
        self.index = read_index_manifest(RunDir(run_dir), needed_by="serve")  # distance, normalize, T

    def _embed(self, inputs: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(embeddings, the same prepared as queries, logits)."""
        embeddings, logits = self.encode(inputs)
        return embeddings, prepare_queries(embeddings, self.index["distance"], self.index["normalize"]), logits

    async def predict(self, inputs: list) -> list[dict]:
        """The answers of a batch of model inputs: one embedding pass, one memory lookup."""
        _, queries, logits = self._embed(inputs)
        nb = await self.memory.search.remote(queries, self.cfg.resmem.k)
        return self.task.serve_answers(self.cfg, logits, nb)

    async def memorize(self, inputs: list, labels: np.ndarray) -> list[int]:
        embeddings, queries, logits = self._embed(inputs)
        rows = {"label": labels, "embedding": embeddings, "logits": logits}
        memory = self.task.memory_rows(self.cfg, rows, self.index["temperature"], {})
        return await self.memory.add.remote(queries, labels, memory["residuals"], rows)
