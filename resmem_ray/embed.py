"""Stage 2, embed: embeddings, logits and residuals of every split with Ray Data.

map_batches over an actor pool: each actor loads the trained model once and turns
batches of images into rows (id, label, embedding, logits, residual). File-backed
splits (ImageFolder) are decoded in a separate CPU step so decoding overlaps inference.
Each split is written as parquet shards under RUN/embeddings/<split>/.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resmem_ray.config import TEXT_MODELS, Config
from resmem_ray.data import SPLITS, Split, decode_images, load_splits, normalize
from resmem_ray.errors import ResMemError
from resmem_ray.resmem import residuals
from resmem_ray.rundir import RunDir, atomic_dir

COLUMNS = ("id", "label", "embedding", "logits", "residual")


class Embedder:
    """A Ray Data actor: one model replica, loaded once."""

    def __init__(self, run_dir: str, temperature: float, num_threads: int):
        import torch

        from resmem_ray.train import load_model

        torch.set_num_threads(num_threads)
        self.model, self.meta = load_model(RunDir(run_dir))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.temperature = temperature

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            x = normalize(batch["image"], self.meta["dataset"]).to(self.device)
            z = self.model.embed(x)
            logits = self.model.head(z).float().cpu().numpy()
        return {"id": batch["id"], "label": batch["label"], "embedding": z.float().cpu().numpy(),
                "logits": logits, "residual": residuals(logits, batch["label"], self.temperature)}


def _decode(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    return {"id": batch["id"], "label": batch["label"],
            "image": decode_images(list(batch["path"]), image_size)}


def split_dataset(split: Split, num_blocks: int):
    """A Ray Dataset of a split's rows (id, label, image or path), in `num_blocks` blocks.
    Images go in as Arrow tensor columns: no per-row Python objects (4x faster to build)."""
    import ray
    from ray.data.extensions import ArrowTensorArray

    blocks = []
    for rows in np.array_split(np.arange(len(split)), num_blocks):
        if not len(rows):
            continue
        columns = {"id": split.ids[rows], "label": split.labels[rows]}
        if split.images is not None:
            columns["image"] = ArrowTensorArray.from_numpy(split.images[rows])
        else:
            columns["path"] = pa.array([split.paths[i] for i in rows])
        blocks.append(pa.table(columns))
    return ray.data.from_arrow(blocks)


def embedded_rows(split: Split, run: RunDir, cfg: Config, image_size: int):
    """A Ray Dataset of the split's (id, label, embedding, logits, residual) rows, computed
    by an actor pool that holds the trained model."""
    import ray.data

    e = cfg.embed
    ds = split_dataset(split, num_blocks=max(4 * e.num_actors, len(split) // (4 * e.batch_size)))
    if split.images is None:
        ds = ds.map_batches(_decode, fn_kwargs={"image_size": image_size},
                            batch_size=e.batch_size, num_cpus=min(1.0, e.cpus_per_actor))
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"run_dir": run.location, "temperature": cfg.resmem.temperature,
                               "num_threads": max(1, int(e.cpus_per_actor))},
        compute=ray.data.ActorPoolStrategy(size=e.num_actors),
        batch_size=e.batch_size, num_cpus=e.cpus_per_actor, num_gpus=e.gpus_per_actor or None,
        batch_format="numpy")


def write_split(ds, run: RunDir, name: str, batch_size: int) -> int:
    """Write a split's embedding rows (a Ray dataset) as parquet under RUN/embeddings/<name>,
    atomically; the number of rows written."""
    with atomic_dir(run.embeddings / name) as tmp:
        ds.write_parquet(str(tmp), min_rows_per_file=max(batch_size, 4096))
        return sum(pq.ParquetFile(p).metadata.num_rows for p in tmp.glob("*.parquet"))


def embed(cfg: Config) -> dict:
    if cfg.model.name in TEXT_MODELS:
        from resmem_ray.text import embed_text

        return embed_text(cfg)
    run = RunDir(cfg.run_dir)
    run.stage_output("train", needed_by="embed")
    splits, info = load_splits(cfg.data, cfg.seed)
    run.mark_running("embed", cfg.to_dict())
    e = cfg.embed
    counts = {}
    for name in SPLITS:
        split = splits[name]
        if len(split) == 0:
            raise ResMemError(f"split '{name}' is empty: check data.limit / data.val_fraction")
        print(f"[embed] {name}: {len(split)} examples on {e.num_actors} actor(s)", flush=True)
        rows = write_split(embedded_rows(split, run, cfg, info.image_size), run, name, e.batch_size)
        if rows != len(split):
            raise ResMemError(f"embed wrote {rows} rows for split '{name}', expected {len(split)}")
        counts[name] = rows
    model_meta = json.loads((run.model / "meta.json").read_text())
    run.mark_done("embed", cfg.to_dict(), rows=counts, embedding_dim=model_meta["embedding_dim"],
                  num_classes=model_meta["num_classes"], temperature=cfg.resmem.temperature,
                  max_id=max(int(splits[s].ids.max()) for s in SPLITS))
    return counts


def read_split(run: RunDir, split: str, needed_by: str, columns=COLUMNS) -> dict[str, np.ndarray]:
    """A split's embedding table as numpy arrays sorted by id, checked against the manifest."""
    entry = run.stage_output("embed", needed_by=needed_by)
    folder = run.embeddings / split
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise ResMemError(f"{folder} holds no parquet files: rerun `resmem embed`")
    table = pq.read_table(files, columns=list(columns))
    if table.num_rows != entry["rows"][split]:
        raise ResMemError(f"{folder} holds {table.num_rows} rows, the manifest says {entry['rows'][split]}")
    out = {}
    order = np.argsort(table.column("id").to_numpy())
    for c in columns:
        col = table.column(c)
        arr = col.to_numpy() if c in ("id", "label") else np.stack(col.to_numpy(zero_copy_only=False))
        out[c] = np.ascontiguousarray(arr[order])
    return out
