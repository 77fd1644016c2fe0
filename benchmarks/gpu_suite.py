"""Every GPU-only path of the suite in one command, for a GPU machine lent for minutes:

  train     CUDA training of ResNet-20 through the suite's trainer (Ray Train, use_gpu) on
            CIFAR-10-shaped random images, with the CIFAR recipe (SGD, crop + flip)
  embed     the embed stage's Ray Data actor pool with GPUs (embed.gpus_per_actor)
  lowp      exact search, index.backend=torch_lowp (bfloat16 scan + float32 re-rank), at
            1M x 64 and 1M x 512, against float32 exact search (index.backend=torch)
  faiss_gpu FAISS Flat and IVF on the GPU (place_index, index.use_gpu) against FAISS Flat on
            the CPU; from a faiss-gpu / faiss-cuda wheel in --wheels DIR when this faiss has
            no GPU support (installed into a temporary folder, measured in a child process)
  lm        the token memory on CUDA: a GPT-2 of bbc_lm's shape (random weights) with and
            without ResMem lookups, benchmarks/lm_throughput.py's passes

On the GPU machine, from the repository root (sized for about 4 minutes; --budget caps it):

    PYTHONPATH=$PWD python -m benchmarks.gpu_suite --json $OUT/gpu_suite.json --wheels .whl --write-results

Each step is timed and guarded on its own: a step that fails records its error line and
the next one runs; one over its time limit, or that would start past --budget, is
stopped or skipped ("skipped: time budget"). Every figure goes to --json, rewritten after
each step, and with --write-results to this script's section of benchmarks/RESULTS.md
(--out). A step stopped at its limit may leave its Ray workers running until they end.
--dry-run runs every step at tiny sizes on the CPU (training with use_gpu=False,
torch_lowp on the host, FAISS on the CPU), so the code paths run anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from results import section, write  # noqa: E402
from results import machine  # noqa: E402  (the JSON record)

ROOT = Path(__file__).resolve().parents[1]
K = 30

QUESTION = ("What do the suite's GPU paths (CUDA training, GPU embed actors, torch_lowp, faiss-gpu, the token "
            "memory on CUDA) deliver on one GPU?")

# per step: its sizes on a GPU and in the dry run, and its time limit (seconds)
SIZES = {
    "train": {"gpu": {"images": 50_000, "epochs": 4, "batch": 128}, "dry": {"images": 200, "epochs": 1, "batch": 50}},
    "embed": {"gpu": {"images": 100_000, "batch": 1024, "actors": (1, 2)},
              "dry": {"images": 128, "batch": 64, "actors": (1,)}},
    "lowp": {"gpu": {"rows": 1_000_000, "dims": (64, 512), "queries": 8192},
             "dry": {"rows": 3000, "dims": (16, 32), "queries": 64}},
    "faiss_gpu": {"gpu": {"rows": 1_000_000, "dims": (64, 512), "queries": 8192, "factory": "IVF1024,Flat",
                          "nprobe": 16},
                  "dry": {"rows": 3000, "dims": (16,), "queries": 64, "factory": "IVF16,Flat", "nprobe": 4}},
    "lm": {"gpu": {"memory_texts": 2000, "test_texts": 128, "batch": 32, "factory": "IVF1024,Flat", "nprobe": 2},
           "dry": {"memory_texts": 24, "test_texts": 8, "batch": 4, "max_length": 16, "factory": "IVF8,Flat",
                   "nprobe": 2}},
}
LIMITS = {"train": 150, "embed": 90, "lowp": 90, "faiss_gpu": 150, "lm": 90}


class Skipped(Exception):
    """A step that cannot run here, and why (not an error)."""


@dataclasses.dataclass
class Suite:
    dry: bool
    device: str  # cuda, or cpu in the dry run
    wheels: str | None
    tmp: Path

    def sizes(self, step: str) -> dict:
        return SIZES[step]["dry" if self.dry else "gpu"]


@contextmanager
def time_limit(seconds: float):
    """TimeoutError in this (the main) thread after `seconds`. An alarm already set
    (pytest-timeout's) that is due first stays in charge; a later one is set again after."""
    def expire(signum, frame):
        raise TimeoutError(f"stopped after its {seconds:.0f} s limit")

    start, before = time.monotonic(), signal.getsignal(signal.SIGALRM)
    pending = signal.getitimer(signal.ITIMER_REAL)[0]
    if pending and pending <= seconds:
        yield
        return
    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, pending - (time.monotonic() - start)))


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no output"


def ray_cpus() -> float:
    """The CPUs free in this process's Ray instance (joined, or started with every core and
    GPU of the machine), once the workers of a step before have given theirs back."""
    import ray

    from resmem_ray.cli import init_ray

    init_ray()
    total, deadline = ray.cluster_resources().get("CPU", 0), time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    return float(ray.available_resources().get("CPU", 0))


def random_cifar(images: int):
    """A data source (image_data.SOURCES) of CIFAR-10's shapes with random pixels and labels:
    `images` train images and a fifth as many test images. Built here, pickled by value to
    the Ray Train workers."""
    def source(cfg):
        rng = np.random.default_rng(0)
        n_test = max(1, images // 5)
        return (rng.integers(0, 256, (images, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, images),
                rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n_test))

    return source


def cifar_config(batch: int, *overrides: str):
    from resmem_ray.config import load_config

    return load_config(str(ROOT / "jobs/configs/cifar10.yaml"), (f"train.batch_size={batch}", *overrides))


# --- the steps: each returns (figures, table rows: (setting, result)) ------------------

def train_step(s: Suite):
    from resmem_ray.runtime.trainer import fit
    from resmem_ray.store.rundir import RunDir
    from resmem_ray.tasks import image_data
    from resmem_ray.tasks.image import recipe

    z = s.sizes("train")
    cpus = max(0.5, ray_cpus() - 1)  # one worker (one GPU); a core left for Ray and the driver
    cfg = cifar_config(z["batch"], f"train.epochs={z['epochs']}", "train.num_workers=1",
                       f"train.use_gpu={not s.dry}", f"train.cpus_per_worker={cpus}")
    r = recipe(cfg)
    source, real_prepare = random_cifar(z["images"]), r.prepare

    def prepare():  # on the worker: the random source stands in for CIFAR-10's files
        image_data.SOURCES["cifar10"] = source
        real_prepare()

    t0 = time.perf_counter()
    _, history = fit(RunDir(s.tmp / "train"), dataclasses.replace(r, prepare=prepare), 1, cpus, use_gpu=not s.dry)
    wall = time.perf_counter() - t0
    n_train = z["images"] - round(cfg.data.val_fraction * z["images"])
    epochs = [h["epoch_s"] for h in history]
    steady = float(np.median(epochs[1:] if len(epochs) > 1 else epochs))  # the first epoch warms CUDA up
    figures = {"train_images": n_train, "val_images": z["images"] - n_train, "epochs": len(epochs),
               "epoch_s": epochs, "images_per_s": n_train / steady, "fit_s": wall, "cpus_per_worker": cpus}
    where = "1 Ray Train worker, use_gpu" if not s.dry else "1 Ray Train worker, CPU"
    rows = [(f"ResNet-20, {n_train:,} random CIFAR-shaped train images (+{z['images'] - n_train:,} val), batch "
             f"{z['batch']}, {len(epochs)} epochs, {where}, {cpus:g} CPUs",
             f"{figures['images_per_s']:,.0f} train images/s; {steady:.1f} s per epoch (median after the first; "
             f"{', '.join(f'{e:.1f}' for e in epochs)}); fit {wall:.0f} s with start-up")]
    return figures, rows


def embed_step(s: Suite):
    from embed import make_run

    from resmem_ray.store.artifacts import read_model_meta
    from resmem_ray.tasks.image import ImageClassification
    from resmem_ray.tasks.splits import Split

    z = s.sizes("embed")
    cpus = max(0.5, ray_cpus() - 1)
    cfg = cifar_config(128)
    run = make_run(s.tmp / "embed", cfg, 3, 10, 32)  # random weights: throughput does not depend on them
    rng = np.random.default_rng(1)
    split = Split(ids=np.arange(z["images"]), labels=rng.integers(0, 10, z["images"]),
                  images=rng.integers(0, 256, (z["images"], 3, 32, 32), dtype=np.uint8))
    figures, rows = {}, []
    for actors in z["actors"]:
        cfg.embed = dataclasses.replace(cfg.embed, num_actors=actors, cpus_per_actor=cpus / actors,
                                        gpus_per_actor=0.0 if s.dry else 1 / actors, batch_size=z["batch"])
        t0 = time.perf_counter()
        ds = ImageClassification().embed_rows(cfg, run, split, "train", read_model_meta(run, "embed"))
        n = sum(len(b["id"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
        seconds = time.perf_counter() - t0
        if n != len(split):
            raise RuntimeError(f"the actor pool returned {n} rows of {len(split)}")
        figures[f"images_per_s_{actors}_actors"] = n / seconds
        gpus = "CPU" if s.dry else f"{1 / actors:g} GPU"
        rows.append((f"ResNet-20 embed, {n:,} CIFAR-shaped images, batch {z['batch']}, {actors} actor(s) x "
                     f"({cpus / actors:g} CPUs, {gpus}), start-up included", f"{n / seconds:,.0f} images/s"))
    return figures, rows


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / want.shape[1] for a, b in zip(got, want)]))


def lowp_step(s: Suite):
    import torch
    from gpu_lookup import best_of, mixture

    from resmem_ray.core.knn import LowPrecisionFlatIndex, TorchFlatIndex, prepare_queries

    z = s.sizes("lowp")
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference in full float32 (torch's default)
    figures, rows = {}, []
    for dim in z["dims"]:
        emb = prepare_queries(mixture(z["rows"], dim, 0), "l2", True)
        q = prepare_queries(mixture(z["queries"], dim, 1), "l2", True)
        answers, rates = {}, {}
        for name, make in (("torch", TorchFlatIndex), ("torch_lowp", LowPrecisionFlatIndex)):
            index = make(emb, False, s.device)
            seconds = best_of(lambda: answers.__setitem__(name, index.search(q, K)[1]), s.device)
            rates[name] = len(q) / seconds
            del index  # device memory back before the next one
            if s.device == "cuda":
                torch.cuda.empty_cache()
        r = recall(answers["torch_lowp"], answers["torch"])
        figures[f"{dim}"] = {"torch_qps": rates["torch"], "torch_lowp_qps": rates["torch_lowp"], f"recall@{K}": r}
        shape = f"{z['rows']:,} x {dim}, {len(q)} queries, k={K}, on {s.device}"
        rows += [(f"{shape}: torch (float32 exact)", f"{rates['torch']:,.0f} queries/s"),
                 (f"{shape}: torch_lowp (bfloat16 + re-rank)",
                  f"{rates['torch_lowp']:,.0f} queries/s ({rates['torch_lowp'] / rates['torch']:.2f}x), "
                  f"recall@{K} {r:.4f} vs float32")]
    return figures, rows


def faiss_gpu_missing() -> str | None:
    """Why this process's faiss cannot search on a GPU; None when it can."""
    try:
        import faiss
    except ImportError:
        return "faiss is not installed here"
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return None
    return f"faiss {faiss.__version__} here has no GPU support or sees no GPU"


def faiss_figures(rows: int, dims: list, queries: int, factory: str, nprobe: int, gpu: bool) -> dict:
    """FAISS Flat on the CPU (the reference, one search) against Flat and `factory` placed
    as the suite places a shard (place_index: on the GPU, and for the IVF also on the CPU;
    without `gpu`, the IVF on the CPU only). Runs in the process of the faiss measured."""
    import faiss
    from gpu_lookup import best_of, mixture

    from resmem_ray.core.knn import build_shard, place_index, prepare_queries, set_search_params

    if gpu and faiss_gpu_missing():
        return {"skipped": faiss_gpu_missing()}
    faiss.omp_set_num_threads(os.cpu_count())
    out = {"faiss": faiss.__version__, "dims": {}}
    for dim in dims:
        emb = prepare_queries(mixture(rows, dim, 0), "l2", True)
        q = prepare_queries(mixture(queries, dim, 1), "l2", True)
        flat = build_shard(emb, "Flat", "l2")
        t0 = time.perf_counter()
        want = flat.search(q, K)[1]
        found = {"faiss-cpu Flat": {"qps": len(q) / (time.perf_counter() - t0), f"recall@{K}": 1.0}}
        ivf = build_shard(emb, factory, "l2")
        set_search_params(ivf, nprobe, 64)
        for name, index, places in (("Flat", flat, [True]), (f"{factory} nprobe={nprobe}", ivf, [False, True])):
            for use_gpu in [p for p in places if gpu or not p]:
                placed, where = place_index(index, "faiss", use_gpu=use_gpu)
                if hasattr(placed, "nprobe"):
                    placed.nprobe = nprobe  # a GPU IVF index holds its own
                got = [None]
                seconds = best_of(lambda: got.__setitem__(0, placed.search(q, K)[1]), "cpu")
                found[f"{where} {name}"] = {"qps": len(q) / seconds, f"recall@{K}": recall(got[0], want)}
        out["dims"][str(dim)] = found
    return out


def faiss_wheel(folder: str | None) -> str | None:
    """The newest faiss GPU wheel in `folder` (faiss-gpu-cu12: faiss_gpu_cu12-*.whl; faiss-cuda)."""
    if not folder:
        return None
    found = sorted(glob.glob(os.path.join(folder, "faiss_gpu*.whl")) + glob.glob(os.path.join(folder, "faiss_cuda*.whl")))
    return found[-1] if found else None


def faiss_step(s: Suite):
    z = s.sizes("faiss_gpu")
    params = {"rows": z["rows"], "dims": list(z["dims"]), "queries": z["queries"], "factory": z["factory"],
              "nprobe": z["nprobe"], "gpu": not s.dry}
    missing = None if s.dry else faiss_gpu_missing()
    if missing is None:
        out = faiss_figures(**params)
    else:
        wheel = faiss_wheel(s.wheels)
        if wheel is None:
            raise Skipped(f"{missing}, and " + (f"{s.wheels} holds no faiss_gpu*.whl or faiss_cuda*.whl"
                                                if s.wheels else "no --wheels DIR was given"))
        target = s.tmp / "faiss_gpu"
        libraries = glob.glob(os.path.join(s.wheels, "nvidia_*.whl"))  # its CUDA libraries, if brought along
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                              str(target), wheel, *libraries], capture_output=True, text=True)
        if pip.returncode != 0:
            raise RuntimeError(f"pip could not install {wheel}: " + last_line(pip.stderr))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT), os.environ.get("PYTHONPATH", "")])}
        child = subprocess.run([sys.executable, __file__, "--faiss-child", json.dumps(params)], env=env,
                               capture_output=True, text=True)  # killed by the step's time limit
        if child.returncode != 0:
            raise RuntimeError(f"{os.path.basename(wheel)}: " + last_line(child.stderr))
        out = json.loads(child.stdout.strip().splitlines()[-1])
        out["wheel"] = os.path.basename(wheel)
    if "skipped" in out:
        raise Skipped(out["skipped"] + (f" ({out['wheel']})" if "wheel" in out else ""))
    rows = []
    for dim, found in out["dims"].items():
        for name, f in found.items():
            rows.append((f"FAISS {out['faiss']} {name}, {z['rows']:,} x {dim}, {z['queries']} queries, k={K}",
                         f"{f['qps']:,.0f} queries/s, recall@{K} {f[f'recall@{K}']:.4f} vs cpu Flat"))
    return out, rows


def lm_step(s: Suite):
    import torch
    from gpu_lookup import best_of
    from lm_throughput import plain, with_memory
    from transformers import GPT2Config, GPT2LMHeadModel

    from resmem_ray.config import load_config
    from resmem_ray.core.knn import build_shard, place_index, prepare_queries
    from resmem_ray.core.sparse import encode
    from resmem_ray.tasks.lm import logits_and_states

    z = s.sizes("lm")
    overrides = [f"text.max_length={z['max_length']}"] if "max_length" in z else []
    cfg = load_config(str(ROOT / "jobs/configs/bbc_lm.yaml"), tuple(overrides))
    t, r = cfg.text, cfg.resmem
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=t.vocab_size, n_positions=t.max_length, n_embd=t.lm_dim,
                                       n_layer=t.lm_layers, n_head=t.lm_heads, bos_token_id=0,
                                       eos_token_id=0)).eval().to(s.device)
    layer = t.lm_embedding
    rng = np.random.default_rng(0)

    def batch_of(n: int) -> dict:  # full-length random texts, in lm_throughput's batch form
        ids = rng.integers(0, t.vocab_size, (n, t.max_length))
        rows, pos = np.nonzero(np.ones((n, t.max_length - 1), bool))
        return {"input_ids": torch.tensor(ids, device=s.device),
                "attention_mask": torch.ones(n, t.max_length, dtype=torch.long, device=s.device),
                "rows": torch.tensor(rows, device=s.device), "pos": torch.tensor(pos, device=s.device),
                "labels": ids[rows, pos + 1]}

    # the memory: the LM's own hidden states and sparse residual rows (top-m) over random texts
    vectors, labels, top_ids, top_probs = [], [], [], []
    for _ in range(0, z["memory_texts"], z["batch"]):
        b = batch_of(z["batch"])
        with torch.inference_mode():
            logits, hidden = logits_and_states(model, b["input_ids"], b["attention_mask"], (b["rows"], b["pos"]), layer)
        vectors.append(hidden.float().cpu().numpy())
        ids, probs = encode(logits.float().cpu().numpy(), t.top_m, r.temperature)
        labels.append(b["labels"])
        top_ids.append(ids)
        top_probs.append(probs.astype(cfg.index.residual_dtype))
    vectors = prepare_queries(np.concatenate(vectors), r.distance, r.normalize)
    memory = {"labels": np.concatenate(labels), "residual_ids": np.concatenate(top_ids),
              "residuals": np.concatenate(top_probs)}
    memory["ids"] = np.arange(len(vectors))
    batches = [batch_of(z["batch"]) for _ in range(0, z["test_texts"], z["batch"])]
    tokens = sum(len(b["labels"]) for b in batches)

    every = dataclasses.replace(cfg, resmem=dataclasses.replace(r, gate_threshold=1.0))  # every token reads
    flat, where = place_index(build_shard(vectors, "Flat", r.distance), "torch", use_gpu=True)
    ivf = build_shard(vectors, z["factory"], r.distance, cfg.index.train_sample)
    settings = [("plain LM", lambda b: plain(model, b, {})),
                (f"ResMem, Flat ({where}), k={r.k}", lambda b: with_memory(model, b, flat, memory, every, layer, 0, {})),
                (f"ResMem, {z['factory']} nprobe={z['nprobe']} (faiss-cpu), k={r.k}",
                 lambda b: with_memory(model, b, ivf, memory, every, layer, z["nprobe"], {}))]
    figures, rows = {"memory_rows": len(vectors), "test_tokens": tokens}, []
    for name, fn in settings:
        seconds = best_of(lambda: [fn(b) for b in batches], s.device)
        figures[name] = tokens / seconds
        ratio = f" ({figures[name] / figures['plain LM']:.2f}x plain)" if name != "plain LM" else ""
        rows.append((f"GPT-2 ({t.lm_layers} layers, {t.lm_dim} dims, vocabulary {t.vocab_size}, random weights), "
                     f"{tokens:,} tokens in batches of {z['batch']} texts; memory {len(vectors):,} x {t.lm_dim}: "
                     f"{name}", f"{figures[name]:,.0f} tokens/s{ratio}"))
    return figures, rows


STEPS = {"train": train_step, "embed": embed_step, "lowp": lowp_step, "faiss_gpu": faiss_step, "lm": lm_step}


# --- the run --------------------------------------------------------------------------

def run_step(s: Suite, name: str, limit: float) -> tuple[dict, list]:
    """One step's record (status ok / skipped / error, seconds, figures) and table rows."""
    t0 = time.perf_counter()
    try:
        with time_limit(limit):
            figures, rows = STEPS[name](s)
        record = {"status": "ok", "figures": figures}
    except Skipped as e:
        record, rows = {"status": "skipped", "reason": str(e)}, []
    except Exception as e:  # the next steps still run: their figures are not lost
        record, rows = {"status": "error", "error": first_line(e)}, []
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record, rows


def outcome(record: dict) -> str:
    if record["status"] == "ok":
        return f"ok in {record['seconds']:.0f} s"
    return f"skipped: {record['reason']}" if record["status"] == "skipped" else f"error: {record['error']}"


def results_lines(s: Suite, budget: float, records: dict, rows: dict) -> list[str]:
    title = "GPU suite: every GPU path on one GPU" + (" (dry run, tiny sizes on CPU)" if s.dry else "")
    lines = section(title, QUESTION,
                    "One command, each step timed and guarded on its own (a failing step records its error and "
                    f"the next one runs), under a {budget:.0f} s budget. Random data and random weights "
                    "throughout: the figures are throughputs and recalls, not accuracies.", "",
                    "| step | setting | result |", "| --- | --- | --- |")
    for name, record in records.items():
        lines.append(f"| {name} | (the step) | {outcome(record)} |")
        lines += [f"| {name} | {setting} | {result} |" for setting, result in rows.get(name, [])]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="gpu_suite.json", help="every step's record and figures (JSON)")
    parser.add_argument("--write-results", action="store_true", help="also write this script's section of --out")
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    parser.add_argument("--wheels", help="a folder of wheels brought along (faiss-gpu-cu12, faiss-cuda, ...)")
    parser.add_argument("--budget", type=float, default=420, help="seconds for the whole run (default 420)")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on the CPU")
    parser.add_argument("--faiss-child", help=argparse.SUPPRESS)  # faiss_figures(**JSON) in a child process
    args = parser.parse_args(argv)
    if args.faiss_child:
        print(json.dumps(faiss_figures(**json.loads(args.faiss_child))))
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite.py: torch sees no CUDA GPU here; --dry-run runs every step at tiny sizes on the CPU",
              file=sys.stderr)
        return 2
    start = time.monotonic()
    records, rows = {}, {}
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        s = Suite(dry=args.dry_run, device="cpu" if args.dry_run else "cuda", wheels=args.wheels, tmp=Path(tmp))
        for name in args.steps:
            left = args.budget - (time.monotonic() - start)
            if left < min(30, LIMITS[name]):
                records[name] = {"status": "skipped", "reason": f"time budget ({args.budget:.0f} s) spent",
                                 "seconds": 0.0}
            else:
                records[name], rows[name] = run_step(s, name, min(LIMITS[name], left))
            print(f"[gpu_suite] {name}: {outcome(records[name])}", flush=True)
            for setting, result in rows[name] if name in rows else []:
                print(f"[gpu_suite]   {setting}: {result}", flush=True)
            write_json(args.json, {"machine": machine(), "dry_run": s.dry, "budget_s": args.budget, "steps": records})
    if args.write_results:
        lines = results_lines(s, args.budget, records, rows)
        write(args.out, lines, "dry-run" if s.dry else "")
    return 0


def write_json(path: str, obj: dict) -> None:
    from resmem_ray.store.files import write_json as atomic

    atomic(Path(path), obj)


if __name__ == "__main__":
    sys.exit(main())
