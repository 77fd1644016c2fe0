"""The sharded memory on Ray: one Ray task builds each shard; shard actors each hold
index.shards_per_actor FAISS shards and their residual rows; a query batch fans out to
all actors in parallel, each answers with the top-k over its shards, and a merge keeps
the global top-k. With exact (Flat) shards the answer equals one exact index over the
memory. More shards than cores are best held several to an actor: each actor's answer
is then one top-k, not one per shard, for the object store to carry and the driver to
merge, and an actor's exact shards are scanned as one index (core/knn.py: combine_flat).

The work is core/knn.py's plain functions (build_shard, search_shard, merge_topk);
this module is the thin Ray shell around them.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import faiss
import numpy as np

from resmem_ray.core.knn import (FAISS_GPU_MAX_K, Neighbours, build_shard, check_index_config, combine_flat,
                                 merge_topk, pack_residuals, place_index, prepare_queries, search_shard,
                                 set_search_params)
from resmem_ray.errors import ResMemError
from resmem_ray.log import Progress, stage_log
from resmem_ray.runtime.instance import local_instance
from resmem_ray.schema import IndexConfig
from resmem_ray.store.artifacts import check_k, load_shard, model_fingerprint, read_pieces, write_memorized
from resmem_ray.store.files import sha256, write_json
from resmem_ray.store.remote import uri_of
from resmem_ray.store.rundir import RunDir

log = stage_log("lookup")


def _build_shard_files(embeddings, ids, labels, residual_rows, cfg: IndexConfig, distance, shard,
                       residual_ids=None) -> dict:
    """A shard's files as bytes: the task needs no storage, so it runs on any node and
    the caller writes the files wherever the run directory is."""
    faiss.omp_set_num_threads(1)  # one task per shard, several tasks per host
    index = build_shard(embeddings, cfg.factory, distance, cfg.train_sample, seed=shard)
    rows = io.BytesIO()
    sparse = {} if residual_ids is None else {"residual_ids": residual_ids}  # sparse codec (sparse.py)
    np.savez(rows, ids=ids, labels=labels, **pack_residuals(residual_rows, cfg.residual_dtype), **sparse)
    name = f"shard-{shard:05d}"
    data = {f"{name}.faiss": faiss.serialize_index(index).tobytes(), f"{name}.npz": rows.getvalue()}
    if cfg.keep_vectors:  # for an exact re-rank (index.rerank), memory-mapped by the shard's readers
        vectors = io.BytesIO()
        np.save(vectors, np.ascontiguousarray(embeddings, dtype=np.float32))
        data[f"{name}.vectors.npy"] = vectors.getvalue()
    return {"shard": shard, "rows": int(len(ids)), "data": data}


def _delivered(folder: str, built: dict) -> dict:
    """A built shard's manifest entry: its files written into `folder` where this host
    sees it (the driver's host, or storage every node mounts), else the files' bytes
    for the driver to write."""
    folder = Path(folder)
    if not folder.is_dir():
        return built
    for name, data in built["data"].items():
        (folder / name).write_bytes(data)
    return {"shard": built["shard"], "rows": built["rows"], "files": {n: sha256(folder / n) for n in built["data"]},
            "bytes": {n: len(d) for n, d in built["data"].items()}}


def _build_shard_task(folder: str, *args, **kwargs) -> dict:
    return _delivered(folder, _build_shard_files(*args, **kwargs))


def _collect(folder: Path, refs: list) -> list[dict]:
    """The shards' manifest entries in shard order, writing the files of shards built on a
    host that does not see `folder` (one shard's bytes held at a time)."""
    import ray

    shards = []
    for i in range(len(refs)):
        try:
            built, refs[i] = ray.get(refs[i]), None
        except (ray.exceptions.RayTaskError, KeyboardInterrupt) as e:
            for later in refs[i + 1:]:  # the index fails as a whole: the other shards' work is wasted
                ray.cancel(later, force=True)  # a build inside FAISS would not see an interrupt until it returns
            if isinstance(getattr(e, "cause", None), ResMemError):  # one line, not the worker's traceback
                raise e.cause from None
            raise
        if "data" in built:
            built = _delivered(str(folder), built)
        shards.append(built)
    return shards


def _remote_build(fn, memory: int = 0):
    import ray

    # "DEFAULT": not captured by an enclosing placement group (a `resmem sweep` trial's)
    return ray.remote(num_cpus=0.5, memory=memory, scheduling_strategy="DEFAULT")(fn)


def shard_task_memory(rows: int, row_bytes: int) -> int:
    """The bytes a shard build task holds at its peak, for Ray to start no more of them on
    a node than its memory takes: about six copies of a row as read (as read, as memory
    rows, prepared, in the index, and the files' bytes; 5.2 GB measured for 3.3M rows of
    64 dims and 10 logits), at most the largest node's memory (one task at a time then)."""
    import ray

    largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]), default=0)
    return int(min(6 * rows * row_bytes, 0.9 * largest))


def _index_manifest(dim: int, shards: list[dict], num_classes: int, cfg: IndexConfig, distance: str,
                    normalize: bool, temperature: float) -> dict:
    return {"dim": int(dim), "rows": sum(s["rows"] for s in shards), "num_classes": int(num_classes),
            "factory": cfg.factory, "distance": distance, "normalize": normalize,
            "temperature": temperature, "residual_dtype": cfg.residual_dtype, "shards": shards}


def write_shards(folder: Path, embeddings: np.ndarray, ids: np.ndarray, labels: np.ndarray,
                 residual_rows: np.ndarray, cfg: IndexConfig, distance: str, normalize: bool,
                 temperature: float, first_shard: int = 0, residual_ids: np.ndarray | None = None) -> dict:
    """Split rows held here into cfg.num_shards contiguous shards, build each in its own
    Ray task and write them to `folder`; return the index manifest (not written: the
    caller places it atomically). With `residual_ids`, residual rows are sparse: the
    probabilities of those token ids. (`resmem index` builds from the split's files
    instead: build_planned_shards.)"""
    n, dim = embeddings.shape
    check_index_config(cfg, n, dim, distance)
    bounds = np.linspace(0, n, cfg.num_shards + 1).astype(int)
    build = _remote_build(_build_shard_task)
    refs = [build.remote(str(folder), embeddings[a:b], ids[a:b], labels[a:b], residual_rows[a:b], cfg, distance,
                         first_shard + s, None if residual_ids is None else residual_ids[a:b])
            for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return _index_manifest(dim, _collect(folder, refs), residual_rows.shape[1], cfg, distance, normalize,
                           temperature)


def _build_planned_shard(folder: str, root: str, run_uri: str | None, pieces: list[dict], columns, memory_rows,
                         dim: int, cfg: IndexConfig, distance: str, normalize: bool, shard: int) -> dict:
    """One shard from its rows of the split's files: read (only its memory columns), turned
    into memory rows by the task, prepared, built."""
    rows = read_pieces(Path(root), pieces, columns, run_uri)
    if rows["embedding"].ndim != 2 or rows["embedding"].shape[1] != dim:
        raise ResMemError(f"{', '.join(sorted({p['file'] for p in pieces}))}: embeddings of shape "
                          f"{rows['embedding'].shape}, the memory's first row has {dim} dims")
    memory = memory_rows(rows)
    built = _build_shard_files(prepare_queries(rows["embedding"], distance, normalize), rows["id"], rows["label"],
                               memory["residuals"], cfg, distance, shard, memory.get("residual_ids"))
    return {**_delivered(folder, built), "num_classes": int(memory["residuals"].shape[1])}


def build_planned_shards(folder: Path, root: Path, run_uri: str | None, plan: list[list[dict]], columns,
                         memory_rows, dim: int, num_classes: int, cfg: IndexConfig, distance: str, normalize: bool,
                         temperature: float, row_bytes: int = 0) -> dict:
    """Build each shard of `plan` (plan_shards) in its own Ray task, which reads its own rows
    from the run directory `root` (or, on a host without it, from `run_uri`) and computes
    their memory rows (`memory_rows(rows)`); the driver holds the plan and one shard's
    entry at a time. `row_bytes` (a row's columns as read) sizes the tasks' memory for Ray
    (shard_task_memory). Returns the index manifest, as write_shards."""
    rows = max(sum(p["stop"] - p["start"] for p in pieces) for pieces in plan)
    build = _remote_build(_build_planned_shard, shard_task_memory(rows, row_bytes) if row_bytes else 0)
    refs = [build.remote(str(folder), str(root), run_uri, pieces, columns, memory_rows, dim, cfg, distance,
                         normalize, s) for s, pieces in enumerate(plan)]
    shards = _collect(folder, refs)
    widths = {s.pop("num_classes") for s in shards}
    if widths != {num_classes}:
        raise ResMemError(f"residual rows of widths {sorted(widths)} across shards, expected {num_classes}")
    return _index_manifest(dim, shards, num_classes, cfg, distance, normalize, temperature)


def add_shard(run: RunDir, manifest: dict, embeddings: np.ndarray, ids: np.ndarray, labels: np.ndarray,
              residual_rows: np.ndarray, record: dict, memorized: dict[str, np.ndarray],
              residual_ids: np.ndarray | None = None, write_shard: bool = False) -> tuple[dict, faiss.Index]:
    """Add rows (embeddings prepared, ids past every id in the memory) as one new exact
    shard, built in this process: a few examples cannot train IVF / PQ clusters. The
    shard's files and the new rows' embedding rows (`memorized`: the task's memory
    columns, which `resmem index` reads back) go in place first, then the index manifest
    (the commit), then the run manifest's hashes, so a reader sees the old memory or the
    new one. `write_shard`:
    the new shard is `resmem serve`'s write shard (manifest["serve_shard"]) and holds the
    rows of the previous one too, which is dropped from the manifest and then deleted.
    `record` goes to manifest["memorized"]. Returns the new manifest and the shard's index."""
    first = max(s["shard"] for s in manifest["shards"]) + 1
    built = _build_shard_files(embeddings, ids, labels, residual_rows,
                               IndexConfig(num_shards=1, factory="Flat", residual_dtype=manifest["residual_dtype"]),
                               manifest["distance"], first, residual_ids)
    entry = {"shard": first, "rows": built["rows"], "files": {}, "bytes": {}}
    for name, data in built["data"].items():
        tmp = run.index / f".{name}.{os.getpid()}.tmp"  # removed by the next lock holder if this dies
        tmp.write_bytes(data)
        entry["files"][name], entry["bytes"][name] = sha256(tmp), len(data)
        os.replace(tmp, run.index / name)
    record = {**record, **write_memorized(run.index, memorized), "model": model_fingerprint(run)}
    replaces = manifest.get("serve_shard") if write_shard else None
    old = [s for s in manifest["shards"] if s["shard"] == replaces]
    manifest = {**manifest, "shards": [s for s in manifest["shards"] if s["shard"] != replaces] + [entry]}
    manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
    manifest["next_id"] = max(manifest["next_id"], int(ids.max()) + 1)
    manifest["memorized"] = [{**m, "shard": first} if m.get("shard") == replaces else m
                             for m in manifest.get("memorized", [])] + [{**record, "shard": first}]
    if write_shard:
        manifest["serve_shard"] = first
    write_json(run.index / "manifest.json", manifest)
    for name in (n for s in old for n in s["files"]):
        (run.index / name).unlink(missing_ok=True)
    run.update_outputs("index")  # the run's manifest vouches for the shards (and a URI run gets them)
    return manifest, faiss.deserialize_index(np.frombuffer(built["data"][f"shard-{first:05d}.faiss"], np.uint8))


class LocalShards:
    """Shards searched in this process, opened the one way every reader opens them (a shard
    actor, serve's memory replica): read from the run directory and checked against the
    manifest, exact ones combined into one index (combine_flat), index.nprobe and
    index.ef_search set (FAISS keeps the build-time values in the file), placed by
    index.backend and index.use_gpu."""

    def __init__(self, index_dir: Path, entries: list[dict], distance: str, settings: IndexConfig):
        self.distance, self.shards, self.where, self.rerank = distance, [], None, settings.rerank
        for index, rows in combine_flat([load_shard(Path(index_dir), entry) for entry in entries]):
            set_search_params(index, settings.nprobe, settings.ef_search)
            index, self.where = place_index(index, settings.backend, settings.use_gpu)
            self.shards.append((index, rows))
        if self.rerank > 1 and not any("vectors" in rows for _, rows in self.shards):
            raise ResMemError(f"index.rerank={self.rerank} re-ranks from the shards' full-precision vectors, and "
                              "these shards have none: set index.keep_vectors=true and rerun `resmem index`")

    def part(self, queries: np.ndarray, k: int) -> tuple:
        """The top-k over these shards in search_shard's form, for another merge_topk."""
        if self.where == "faiss-gpu" and k > FAISS_GPU_MAX_K:
            raise ResMemError(f"k={k} is over FAISS GPU's limit of {FAISS_GPU_MAX_K}: lower k, or set "
                              "index.backend=torch or index.use_gpu=false")
        parts = [search_shard(index, rows, queries, k, self.distance, self.rerank) for index, rows in self.shards]
        return parts[0] if len(parts) == 1 else merge_topk(parts, k).as_part()

    def search(self, queries: np.ndarray, k: int) -> Neighbours:
        return merge_topk([self.part(queries, k)], k)


class ShardActor:
    """Holds one or more shards (LocalShards) and answers a query batch with the top-k
    over all of them. Ray restarts a dead actor, which runs __init__ again and so reloads
    its shards."""

    def __init__(self, index_dir: str, entries: list[dict], distance: str, settings: IndexConfig,
                 run_uri: str | None = None):
        threads = max(1, int(round(settings.cpus_per_shard)))
        faiss.omp_set_num_threads(threads)  # the actor's CPU share, not the whole host
        self.error, self.shards = None, None
        try:
            if run_uri:  # a URI run: this node's mirror of its index (fetched if missing)
                index_dir = str(RunDir(run_uri, pull=("index",)).index)
            self.shards = LocalShards(Path(index_dir), entries, distance, settings)
        except ResMemError as e:  # kept for ready(): Ray drops the cause of a failed __init__
            self.error = e

    def ready(self) -> str:
        if self.error:
            raise self.error
        return self.shards.where

    def search(self, queries: np.ndarray, k: int):
        self.ready()
        return self.shards.part(queries, k)


class ShardedMemory:
    """S shards, index.shards_per_actor to an actor, x R replicas of shard actors behind
    one `search(queries, k)` call.

    Each query batch goes to one replica of every actor (round robin over replicas). A
    replica that dies is restarted by Ray and reloads its shards; meanwhile its query is
    sent to the next replica, or, with one replica, retried by Ray once it is back.
    """

    def __init__(self, index_dir: Path, manifest: dict, settings: IndexConfig | None = None):
        import ray

        settings = settings or IndexConfig()
        self.manifest, self.replicas, self.calls = manifest, settings.replicas, 0
        per = settings.shards_per_actor
        # the small shards memorize adds join the last actor: memorizing never asks for more CPUs
        added = {m.get("shard") for m in manifest.get("memorized", [])}
        built = [s for s in manifest["shards"] if s["shard"] not in added] or manifest["shards"]
        groups = [built[i:i + per] for i in range(0, len(built), per)]
        groups[-1] = groups[-1] + [s for s in manifest["shards"] if s not in built]
        num_actors = len(groups) * settings.replicas
        gpus = 0.0
        if settings.use_gpu:
            available = ray.cluster_resources().get("GPU", 0)
            if available:
                gpus = min(1.0, available / num_actors)
            else:
                log.info("index.use_gpu=true but the Ray cluster has no GPU: shard actors "
                         "run on CPU")
        actor = ray.remote(ShardActor).options(
            num_cpus=settings.cpus_per_shard, num_gpus=gpus, max_restarts=-1,
            scheduling_strategy="DEFAULT",  # not captured by an enclosing placement group (a sweep trial's)
            # with one replica Ray retries in-flight queries after the restart; with more,
            # search() sends them to another replica at once
            max_task_retries=-1 if settings.replicas == 1 else 0)
        need = num_actors * settings.cpus_per_shard
        held = f" ({per} shards each)" if per > 1 and len(groups) < len(manifest["shards"]) else ""
        asked = (f"{len(manifest['shards'])} shards in {len(groups)} actor(s){held} x {settings.replicas} replicas"
                 f" = {num_actors} shard actors x index.cpus_per_shard={settings.cpus_per_shard:g} CPU = {need:g} CPUs")
        total = ray.cluster_resources().get("CPU", 0)
        if need > total and local_instance():  # no node will join
            raise ResMemError(f"{asked}, but this Ray instance has {total:g} CPUs: lower index.num_shards, "
                              "index.replicas or index.cpus_per_shard")
        source = uri_of(index_dir)
        self.actors = [[actor.remote(str(index_dir), group, manifest["distance"], settings,
                                     source[0] if source else None)
                        for _ in range(settings.replicas)] for group in groups]
        try:
            self.placement = ray.get([a.ready.remote() for reps in self.actors for a in reps],
                                     timeout=settings.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ResMemError(f"{asked}: not all could be placed within index.placement_timeout_s="
                              f"{settings.placement_timeout_s:g} s (the cluster has "
                              f"{ray.available_resources().get('CPU', 0):g} of {ray.cluster_resources().get('CPU', 0):g}"
                              " CPUs free)") from None
        except BaseException:
            self.close()
            raise
        log.info(asked)

    def search(self, queries: np.ndarray, k: int) -> Neighbours:
        return self._merge(self._fan_out(queries, k), k)

    def _fan_out(self, queries: np.ndarray, k: int) -> tuple:
        """Send a query batch to one replica of every actor; returns what _merge waits on."""
        import ray

        m = self.manifest
        if queries.ndim != 2 or queries.shape[1] != m["dim"]:
            raise ResMemError(f"query embeddings have shape {queries.shape}, the index holds "
                              f"{m['dim']}-dim vectors")
        check_k(k, m["rows"])
        ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        first = self.calls % self.replicas
        self.calls += 1
        return [reps[first].search.remote(ref, k) for reps in self.actors], first, ref

    def _merge(self, sent: tuple, k: int) -> Neighbours:
        futures, first, ref = sent
        return merge_topk([self._get(group, future, first, ref, k) for group, future in enumerate(futures)], k)

    def search_batches(self, queries: np.ndarray, k: int, batch_size: int, progress: bool = True) -> Neighbours:
        """`search` over many queries, `batch_size` per round trip, with progress lines unless
        the caller shows its own. The next batch is sent before this one is merged, so the
        shards search while the driver merges."""
        parts, t0, shown = [], time.time(), Progress(log) if progress else (lambda *a, **kw: None)
        starts = range(0, max(len(queries), 1), batch_size)  # no queries: one empty answer
        sent = self._fan_out(queries[:batch_size], k)
        for start in starts:
            following = start + batch_size
            ahead = self._fan_out(queries[following:following + batch_size], k) if following < len(queries) else None
            parts.append(self._merge(sent, k))
            sent = ahead
            done = min(following, len(queries))
            shown(f"{done}/{len(queries)} queries ({done / max(time.time() - t0, 1e-9):.0f}/s)",
                  last=done == len(queries))
        fields = ("distances", "ids", "labels", "residuals") + (("residual_ids",) if parts[0].residual_ids is not None
                                                               else ())
        return Neighbours(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))

    def _get(self, group: int, future, replica: int, ref, k: int):
        """The answer of one actor's shards, failing over to its other replicas."""
        import ray
        from ray.exceptions import RayActorError

        for _ in range(1, 4 * self.replicas):
            try:
                return ray.get(future)
            except RayActorError:
                if self.replicas == 1:
                    raise
                replica = (replica + 1) % self.replicas
                future = self.actors[group][replica].search.remote(ref, k)
        return ray.get(future)

    def close(self) -> None:
        import ray

        for reps in self.actors:
            for a in reps:
                ray.kill(a, no_restart=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
