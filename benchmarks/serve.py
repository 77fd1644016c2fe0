"""`resmem serve` under load: requests/s and latency of single-example requests at several
numbers of concurrent clients, and the time from a /memorize response to the first
prediction that uses the new rows.

    python benchmarks/serve.py --run runs/digits

Works on a copy of the run (memorize writes into it), with its own local Ray instance
(--cpus) and the application on a free loopback port. Each client is a thread with one
keep-alive HTTP connection sending one test image per request, back to back, for
--seconds per level; the clients run on the same machine as the application. The levels
go to the ingress replica's own port (serve.direct_ingress); 16 clients are also sent
through Serve's HTTP proxy (serve.port) for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from results import section, write


QUESTION = ("How many requests/s does `resmem serve` answer, at what latency, and how soon after /memorize is a "
            "new row used?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive connection."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, path: str, payload: dict) -> dict:
        self.conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}: {body[:200]!r}")
        return json.loads(body)


def load_level(port: int, images: list, clients: int, seconds: float) -> dict:
    """`clients` threads sending single-image /predict requests for `seconds`."""
    latencies, errors, stop = [[] for _ in range(clients)], [], time.perf_counter() + seconds

    def worker(i: int):
        client = Client(port)
        n = i
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                client.post("/predict", {"examples": [images[n % len(images)]]})
            except Exception as e:  # noqa: BLE001: counted and reported, the loop goes on
                errors.append(str(e))
                client = Client(port)
                continue
            latencies[i].append(time.perf_counter() - t0)
            n += clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.concatenate([np.asarray(x) for x in latencies]) * 1000
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "rps": len(lat) / wall,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}


def memorize_to_visible(port: int, images: list, labels: np.ndarray, trials: int) -> list[tuple[float, float, int]]:
    """(memorize latency, ms from its response to the first prediction that follows the new
    label, predictions sent until then) for `trials` images, each memorized 3 times under
    another label."""
    client, out = Client(port), []
    for i in range(trials):
        new = int(labels[i] + 1) % 10
        t0 = time.perf_counter()
        ids = client.post("/memorize", {"examples": [images[i]] * 3, "labels": [new] * 3})["ids"]
        t1, sent = time.perf_counter(), 0
        while True:
            (answer,) = client.post("/predict", {"examples": [images[i]]})["predictions"]
            sent += 1
            if answer["resmem"]["class"] == new and answer["neighbours"][0]["id"] in ids:
                break
        out.append(((t1 - t0) * 1000, (time.perf_counter() - t1) * 1000, sent))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/digits", help="a finished run directory (copied first)")
    parser.add_argument("--clients", default="1,8,16,32")
    parser.add_argument("--seconds", type=float, default=10.0, help="per level")
    parser.add_argument("--cpus", type=int, default=2, help="the local Ray instance's CPUs")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args()

    import ray
    from ray import serve

    from resmem_ray.config import config_from_dict
    from resmem_ray.stages.serve import replica_urls, start
    from resmem_ray.store.files import read_json
    from resmem_ray.tasks.registry import task_for

    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        shutil.copytree(args.run, run)
        raw = read_json(run / "manifest.json")["config"]
        cfg = config_from_dict({**raw, "run_dir": str(run)})
        proxy = free_port()
        cfg = dataclasses.replace(cfg, serve=dataclasses.replace(
            cfg.serve, port=proxy, open_memorize=True, replicas=args.replicas, max_batch_size=args.max_batch_size))
        test = task_for(cfg).load_splits(cfg)[0]["test"]
        images = [im.tolist() for im in test.images]
        if cfg.serve.direct_ingress:
            os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # as `resmem serve` starts Ray
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            t0 = time.perf_counter()
            start(cfg)
            startup = time.perf_counter() - t0
            direct = replica_urls(cfg.serve)
            port = int(direct[0].rsplit(":", 1)[1]) if direct else proxy
            load_level(port, images, 4, 2.0)  # warm-up
            levels = [load_level(port, images, int(c), args.seconds) for c in args.clients.split(",")]
            via_proxy = load_level(proxy, images, 16, args.seconds) if direct else None
            visible = memorize_to_visible(port, images, test.labels, trials=10)
        finally:
            serve.shutdown()
            ray.shutdown()
        offline = offline_evaluate(run, raw, len(images))
    load = os.getloadavg()
    s = cfg.serve
    lines = section(
        f"Serving {Path(args.run).name}: `resmem serve` requests/s and latency on loopback", QUESTION,
        f"Run: {cfg.data.name}, {cfg.model.name} (width {cfg.model.width}), memory of "
        f"{read_json_rows(args.run)} rows in {cfg.index.num_shards} exact shard(s), k={cfg.resmem.k}. "
        f"Application: {s.replicas} model replica(s) x {s.cpus:g} CPU, memory searched "
        f"{'by shard actors' if s.shard_actors else 'in the memory replica'}, serve.max_batch_size={s.max_batch_size}, "
        f"batch_wait_timeout_s={s.batch_wait_timeout_s:g}; a local Ray instance of {args.cpus} CPUs; started in "
        f"{startup:.1f} s. Clients: threads on the same machine, one keep-alive connection each, one test image "
        f"per request, {args.seconds:g} s per level, sent to "
        f"{'the ingress replica (direct ingress)' if direct else 'the HTTP proxy'}.",
        f"Load average at the end (1, 5, 15 min): {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}"
        + (" -- the machine was shared with other jobs while this ran, so the figures are taken under load."
           if load[0] > 2 else "."), "",
        "| concurrent clients | requests | errors | requests/s | p50 latency (ms) | p99 latency (ms) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |")
    lines += [f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} |"
              for r in levels]
    if via_proxy:
        r = via_proxy
        lines += [f"| {r['clients']}, through the HTTP proxy | {r['requests']} | {r['errors']} | {r['rps']:.0f} | "
                  f"{r['p50']:.1f} | {r['p99']:.1f} |"]
    mem, vis = np.array([v[0] for v in visible]), np.array([v[1] for v in visible])
    first = sum(v[2] == 1 for v in visible)
    at16 = next((r for r in levels if r["clients"] == 16), None)
    lines += ["", f"/memorize (3 copies of one image under a new label; {len(visible)} trials): the call takes "
              f"{np.median(mem):.0f} ms median ({mem.max():.0f} ms max); from its response to the first "
              f"prediction that follows the new label: {np.median(vis):.1f} ms median ({vis.max():.1f} ms max); "
              f"the first prediction sent after the response followed it in {first} of {len(visible)} trials."]
    lines += ["", f"Offline, `resmem evaluate` on the same run answers the {offline['queries']} test queries in "
              f"{offline['seconds']:.1f} s ({offline['queries'] / offline['seconds']:.0f} queries/s, batches of "
              f"{offline['batch']}; the stage's own time: shard actors starting, every report row and plot included)."]
    if at16:
        met = at16["rps"] >= 200 and at16["p99"] < 100
        lines += ["", f"Target (>= 200 requests/s at 16 clients with p99 < 100 ms): "
                  f"{'met' if met else 'not met'} ({at16['rps']:.0f} requests/s, p99 {at16['p99']:.1f} ms)."]
    write(args.out, lines, Path(args.run).name)


def offline_evaluate(run: Path, raw: dict, queries: int) -> dict:
    """`resmem evaluate` over the copied run, in its own Ray instance: the stage's seconds."""
    import yaml

    from resmem_ray.cli import main as resmem

    config = run.parent / "config.yaml"
    config.write_text(yaml.safe_dump({**raw, "run_dir": str(run)}))
    if resmem(["evaluate", "--config", str(config)]) != 0:
        raise SystemExit("resmem evaluate failed on the copied run")
    import ray

    ray.shutdown()
    stage = json.loads((run / "manifest.json").read_text())["stages"]["evaluate"]
    return {"queries": queries, "seconds": stage["seconds"], "batch": raw["evaluate"]["batch_size"]}


def read_json_rows(run: str) -> int:
    return json.loads(Path(run, "index", "manifest.json").read_text())["rows"]


if __name__ == "__main__":
    main()
