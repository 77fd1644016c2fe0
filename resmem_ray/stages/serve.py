"""`resmem serve`: a Ray Serve application over a finished run that answers from the
sharded memory and memorizes new labelled examples live.

  GET  /healthz    the ingress is up
  GET  /readyz     the memory answers (its rows and shards)
  POST /predict    {"examples": [...]} (image runs: arrays or base64 PNG strings; text
                   runs: strings), or one PNG body (Content-Type: image/png)
                   -> {"predictions": [{base, resmem, gate, neighbours}, ...]}
  POST /memorize   {"examples": [...], "labels": [...]} (or a PNG body and ?label=N),
                   with `Authorization: Bearer <serve.token>` unless serve.open_memorize
                   -> {"ids": [...], "memory_rows": N}

The ingress here checks every request before anything reaches the model or the memory:
a bad one is a 4xx with {"error": one line} and adds nothing. Good ones are gathered into
batches (serve.batch): one model call per batch. The model replicas and the memory are
runtime/serving.py.

With serve.direct_ingress (Ray Serve's throughput-optimised mode, set before Ray starts),
each ingress replica also answers HTTP on its own port, without the HTTP proxy's hop.
"""
# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request)
# at runtime, and Serve's ingress wrapper cannot resolve them from strings.

import contextlib
import hmac
import json
import logging
import re
import signal
import socket
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import RayServeException

from resmem_ray.errors import ConfigError, ResMemError
from resmem_ray.log import stage_log, verbose
from resmem_ray.runtime.instance import local_instance
from resmem_ray.runtime.serving import Memory, Model
from resmem_ray.schema import Config, ServeConfig
from resmem_ray.stages.evaluate import check_matches_index
from resmem_ray.store.artifacts import check_codec, check_k, read_index_manifest, read_model_meta
from resmem_ray.store.files import read_json, write_json
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.registry import task_for

log = stage_log("serve")

APP = "resmem"
CONCURRENT_BATCHES = 4
PREDICT_ATTEMPTS = 5  # a model replica that dies mid-batch: its requests go to another one (or its successor)
app = FastAPI(title="resmem serve")


class Refused(Exception):
    """A request answered with a 4xx and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _refusal(e: Exception) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=getattr(e, "status", 400))


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(self, task, meta: dict, settings: ServeConfig, token: str | None, model, memory):
        self.task, self.meta, self.settings, self.token = task, meta, settings, token
        self.model, self.memory = model, memory
        self._predict.set_max_batch_size(settings.max_batch_size)
        self._predict.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        try:
            return {"status": "ready", **await self.memory.ready.remote()}
        except Exception as e:  # noqa: BLE001: any failure of the memory means not ready
            return JSONResponse({"status": "not ready", "error": str(e).splitlines()[0]}, status_code=503)

    @app.post("/predict")
    async def predict(self, request: Request):
        try:
            inputs, _ = await self._examples(request, labelled=False)
        except (Refused, ResMemError) as e:
            return _refusal(e)
        return {"predictions": await self._predict(inputs)}

    # batches in flight at once: a batch spends most of its time in the hops to the model
    # and the memory, so one at a time leaves the CPUs idle
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=CONCURRENT_BATCHES)
    async def _predict(self, requests: list[list]) -> list[list[dict]]:
        """Each request is a list of model inputs; one model call for the whole batch."""
        inputs = [x for r in requests for x in r]
        for attempt in range(PREDICT_ATTEMPTS):  # a prediction is idempotent: a dead replica's is sent again
            try:
                answers = await self.model.predict.remote(inputs)
                break
            except (RayActorError, ActorUnavailableError):
                if attempt == PREDICT_ATTEMPTS - 1:
                    raise
        bounds = np.cumsum([0] + [len(r) for r in requests])
        return [answers[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    @app.post("/memorize")
    async def memorize(self, request: Request):
        try:
            self._authorize(request)
            inputs, labels = await self._examples(request, labelled=True)
        except (Refused, ResMemError) as e:
            return _refusal(e)
        ids = await self.model.memorize.remote(inputs, labels)
        return {"ids": ids, "memory_rows": (await self.memory.ready.remote())["rows"]}

    def _authorize(self, request: Request) -> None:
        if self.settings.open_memorize:
            return
        if self.token is None:
            raise Refused(403, "POST /memorize is closed: set serve.token_file (or serve.token), or "
                               "serve.open_memorize: true")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Refused(401, "POST /memorize needs the header Authorization: Bearer <token>")
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise Refused(403, "POST /memorize: the bearer token is wrong")

    async def _examples(self, request: Request, labelled: bool):
        """(model inputs, labels or None) of a request, or Refused / ResMemError naming the problem."""
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise Refused(413, f"the request body is {declared} bytes, over serve.max_request_bytes={limit}")
        body = await request.body()
        if len(body) > limit:
            raise Refused(413, f"the request body is {len(body)} bytes, over serve.max_request_bytes={limit}")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind in ("image/png", "application/octet-stream"):
            items, labels = [body], None
            if labelled:
                label = request.query_params.get("label", "")
                if not re.fullmatch(r"-?[0-9]+", label):  # not str.isdigit: it takes '²', which int() refuses
                    raise Refused(400, f"a PNG body to /memorize needs its class as ?label=N, got {label!r:.40}")
                labels = [int(label)]
        else:
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                raise Refused(400, f"the request body is not valid JSON: {e}") from None
            except RecursionError:
                raise Refused(400, "the request body nests JSON arrays or objects too deeply to parse") from None
            if not isinstance(payload, dict) or not isinstance(payload.get("examples"), list):
                raise Refused(400, 'the request body must be a JSON object {"examples": [...]'
                                   + (', "labels": [...]}' if labelled else "}"))
            items, labels = payload["examples"], payload.get("labels")
        if not items:
            raise Refused(400, "the request holds no examples (an empty examples list)")
        if len(items) > self.settings.max_examples:
            raise Refused(413, f"{len(items)} examples in one request, over serve.max_examples="
                               f"{self.settings.max_examples}")
        try:
            inputs = self.task.serve_inputs(items, self.meta)
            return inputs, self.task.serve_labels(labels, len(items), self.meta) if labelled else None
        except RecursionError:  # JSON that parses, nested too deeply for the checks (or their messages)
            raise Refused(400, "the request's examples nest arrays too deeply") from None


def read_token(s: ServeConfig) -> str | None:
    """The bearer token of POST /memorize: serve.token_file's first line, or serve.token."""
    if s.token_file:
        path = Path(s.token_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"config key serve.token_file: no such file {path}")
        lines = path.read_text().strip().splitlines()
        token = lines[0] if lines else ""
        if not token:
            raise ConfigError(f"config key serve.token_file: {path} is empty")
        return token
    if s.token is not None and not s.token.strip():
        raise ConfigError("config key serve.token must not be empty")
    return s.token


def start(cfg: Config) -> str:
    """Check the run, deploy the application (Serve's HTTP proxy on serve.host:serve.port),
    return its URL once every replica is up."""
    task = task_for(cfg)
    run = RunDir(cfg.run_dir)
    manifest = read_index_manifest(run, needed_by="serve")
    meta = read_model_meta(run, needed_by="serve")
    task.serve_inputs([], meta)  # a task that is not served says so here
    check_codec(run, manifest, task.codec, task.name)
    check_matches_index(cfg, manifest)
    check_k(cfg.resmem.k, manifest["rows"], "config key resmem.k")
    s = cfg.serve
    token = read_token(s)
    check_fits(cfg, manifest)
    # Serve's INFO lines (replicas starting, each request) go to its log files unless --verbose
    logs = None if verbose() else {"log_level": "WARNING"}
    if logs:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": s.host, "port": s.port}, logging_config=logs)
    memory = Memory.options(ray_actor_options={"num_cpus": 0.1}, logging_config=logs).bind(run.location, cfg)
    model = Model.options(num_replicas=s.replicas, max_ongoing_requests=max(128, 4 * s.max_batch_size),
                          ray_actor_options={"num_cpus": s.cpus, "num_gpus": s.gpus}, logging_config=logs).bind(
        task, run.location, cfg, memory, max(1, int(s.cpus)))
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0.1}, logging_config=logs).bind(
        task, meta, s, token, model, memory)
    serve.run(ingress, name=APP, route_prefix="/", blocking=False)
    url = f"http://{s.host}:{s.port}"
    log.info(f"{url}: POST /predict, POST /memorize ({'open' if s.open_memorize else 'token' if token else 'closed'}), "
             f"GET /healthz, /readyz; {manifest['rows']} memory rows, {s.replicas} model replica(s)")
    direct = replica_urls(s)
    if direct:
        log.info(f"the ingress replica(s) answer directly too, without the proxy's hop: {', '.join(direct)}")
    return url


def check_fits(cfg: Config, manifest: dict) -> None:
    """On a local Ray instance, refuse an application that cannot all be placed (it
    would wait for CPUs forever), naming what it asks for."""
    import ray

    s, index = cfg.serve, cfg.index
    shard_cpus = 0.0
    if s.shard_actors:
        actors = -(-len(manifest["shards"]) // index.shards_per_actor) * index.replicas
        shard_cpus = actors * index.cpus_per_shard
    need = 0.2 + s.replicas * s.cpus + shard_cpus
    total = ray.cluster_resources().get("CPU", 0)
    if need > total and local_instance():
        raise ResMemError(f"`resmem serve` asks for {need:g} CPUs (ingress and memory 0.2, serve.replicas={s.replicas}"
                          f" x serve.cpus={s.cpus:g}" + (f", shard actors {shard_cpus:g} (index.*)" if shard_cpus else "")
                          + f"), but this Ray instance has {total:g}: lower serve.replicas or serve.cpus"
                          + (" or index.cpus_per_shard" if shard_cpus else ""))


def replica_urls(s: ServeConfig) -> list[str]:
    """The ingress replicas' own HTTP addresses in direct-ingress mode ([] without it)."""
    import ray
    from ray.serve.context import _get_global_client  # Serve 2.60 has no public call for them

    try:
        groups = ray.get(_get_global_client()._controller.get_target_groups.remote(APP), timeout=10)
    except Exception:  # noqa: BLE001: an older or newer Serve: the proxy's URL still answers
        return []
    return sorted({f"http://{t.ip if s.host in ('0.0.0.0', '::') else s.host}:{t.port}" for g in groups
                   if str(g.protocol).upper().endswith("HTTP") for t in g.targets if t.port != s.port})


class Terminated(KeyboardInterrupt):
    """SIGTERM: `resmem serve` stops as on Ctrl-C, and exits 128 + 15."""

    exit_code = 143


def _terminate(signum, frame):
    raise Terminated()


PROCESSES = "serve.processes.json"  # in the run directory while `resmem serve` runs on its own Ray instance


def serve_run(cfg: Config) -> None:
    """The stage: start the application and keep it up until Ctrl-C or SIGTERM, which
    delete it and raise KeyboardInterrupt (the caller says so in one line)."""
    # Ray's own SIGTERM handler exits from inside the handler and the driver aborts in
    # its teardown (exit 134, C++ frames): take the Ctrl-C path instead
    signal.signal(signal.SIGTERM, _terminate)
    record = RunDir(cfg.run_dir).root / PROCESSES
    stop_stale_processes(record)
    try:
        start(cfg)
        record_processes(record)
        while True:
            time.sleep(3600)
    finally:
        try:
            serve.delete(APP)
        except RayServeException:  # Serve never started: a check refused the run
            pass
        record.unlink(missing_ok=True)


def record_processes(path: Path) -> None:
    """The processes of the Ray instance this process started (none on a cluster): a
    `resmem serve` killed with SIGKILL cannot stop them, the next one on the run does."""
    import psutil  # Ray's own copy

    if not local_instance():
        return
    me = psutil.Process()
    write_json(path, {"pid": me.pid, "host": socket.gethostname(),
                      "processes": [{"pid": p.pid, "started": p.create_time()} for p in me.children(recursive=True)]})


def stop_stale_processes(path: Path) -> None:
    """Stop the processes a `resmem serve` killed on this run left running (its record
    outlived it; the run's lock is ours, so it is gone), and say so in one line."""
    import psutil

    if not path.is_file():
        return
    try:
        record = read_json(path)
        host, pid, entries = record["host"], record["pid"], record["processes"]
    except (ResMemError, OSError, KeyError, TypeError):  # damaged: nothing to act on
        host, pid, entries = socket.gethostname(), "?", []
    if host != socket.gethostname():
        log.info(f"a `resmem serve` (pid {pid} on {host}) was killed on this run: its Ray processes "
                 f"may still run there")
        entries = []
    stale = []
    for entry in entries:
        try:
            proc = psutil.Process(entry["pid"])
            # the same process (not a new one under a reused pid), not yet reaped
            if abs(proc.create_time() - entry["started"]) < 0.1 and proc.status() != psutil.STATUS_ZOMBIE:
                stale.append(proc)
        except (psutil.Error, KeyError, TypeError):
            pass
    for proc in stale:
        proc.terminate()
    for proc in psutil.wait_procs(stale, timeout=3)[1]:  # Ray's agents ignore SIGTERM
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if stale:
        log.info(f"stopped {len(stale)} process(es) of the Ray instance of a killed `resmem serve` "
                 f"(pid {pid}) on this run")
    path.unlink(missing_ok=True)
