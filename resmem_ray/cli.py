"""`resmem` command line: one subcommand per pipeline stage, and `run` for all of them.

    resmem run --config jobs/configs/digits.yaml train.epochs=5 run_dir=runs/d5

Connects to the Ray cluster in RAY_ADDRESS (set inside `ray job submit`), or starts a
local Ray instance. A user-facing problem exits with status 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from resmem_ray.config import Config, load_config
from resmem_ray.errors import ResMemError


def _stages():
    from resmem_ray.embed import embed
    from resmem_ray.evaluate import evaluate
    from resmem_ray.index import build_index
    from resmem_ray.neighbour_transformer import train_neighbour_transformer
    from resmem_ray.sweep import sweep
    from resmem_ray.train import train
    from resmem_ray.tune import tune_resmem

    return {"train": train, "embed": embed, "index": build_index, "transformer": train_neighbour_transformer,
            "tune": tune_resmem, "evaluate": evaluate, "sweep": sweep}


STAGE_HELP = [("train", "train the base model (Ray Train)"),
              ("embed", "embeddings, logits and residuals of every split (Ray Data)"),
              ("index", "build the sharded FAISS memory (Ray tasks)"),
              ("transformer", "train the neighbour Transformer on the train split's neighbours (Ray Train)"),
              ("tune", "Ray Tune over k, sigma, T, gate on val; then evaluate the best once on test"),
              ("evaluate", "test-split report from sharded lookup actors"),
              ("run", "all stages in order"),
              ("memorize", "add labelled examples (--examples FILE.npz) to the memory, no retraining"),
              ("sweep", "Ray Tune + ASHA over the base model (sweep.width, sweep.lr): the pipeline per trial")]
SUBMIT_USAGE = ("resmem submit [--address URL] [--runtime-env FILE] [--working-dir DIR] [--no-wait] "
                "STAGE [--config FILE] [key=value ...]")


def init_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)


def run_stage(name: str, cfg: Config):
    t0 = time.time()
    print(f"== {name} ==", flush=True)
    out = _stages()[name](cfg)
    print(f"== {name} done in {time.time() - t0:.1f}s ==", flush=True)
    return out


def run_pipeline(cfg: Config) -> None:
    """The stages in order (transformer when neighbour_transformer.enabled); a stage whose
    outputs still match the manifest (same config keys, same file hashes) is skipped, so a
    rerun continues where a run stopped."""
    from resmem_ray.rundir import RunDir

    run = RunDir(cfg.run_dir)
    stages = ("train", "embed", "index", "transformer", "evaluate")
    for name in stages if cfg.neighbour_transformer.enabled else [s for s in stages if s != "transformer"]:
        if run.stale_reason(name, cfg.to_dict()) is None:
            print(f"== {name}: finished, outputs match the manifest: skipped ==", flush=True)
        else:
            run_stage(name, cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resmem", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in STAGE_HELP:
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", help="YAML config (defaults: the digits run)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5")
        if name == "memorize":
            p.add_argument("--examples", required=True,
                           help=".npz with images (N, C, H, W) uint8 and labels (N,)")
    p = sub.add_parser("submit", usage=SUBMIT_USAGE,
                       help="run a stage (or `run`) as a Ray job on a cluster, stream its logs, return its status")
    p.add_argument("--address", help="Ray dashboard / jobs address, e.g. http://127.0.0.1:8265 "
                   "(default: RAY_ADDRESS)")
    p.add_argument("--runtime-env", help="runtime-env YAML (pip, image_uri, env_vars), e.g. cluster/runtime_env.yaml")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working_dir (default: .)")
    p.add_argument("--no-wait", action="store_true", help="return once submitted")
    p.add_argument("stage", help="train | embed | index | tune | evaluate | run | memorize")
    p.add_argument("stage_args", nargs=argparse.REMAINDER, help="the stage's --config and overrides")
    args = parser.parse_args(argv)
    if args.command == "submit":
        return _submit(args)
    try:
        cfg = load_config(args.config, tuple(args.overrides))
        init_ray()
        if args.command == "run":
            run_pipeline(cfg)
        elif args.command == "memorize":
            from resmem_ray.memorize import memorize

            memorize(cfg, args.examples)
        else:
            run_stage(args.command, cfg)
        if args.command in ("run", "evaluate") or (args.command == "tune" and cfg.tune.evaluate):
            from resmem_ray.rundir import RunDir

            print(RunDir(cfg.run_dir).report.joinpath("report.md").read_text())
    except ResMemError as e:
        cause = getattr(e, "cause", None) or e  # errors raised inside Ray tasks arrive wrapped
        print(f"resmem: error: {cause}", file=sys.stderr)
        return 2
    return 0


def _submit(args) -> int:
    from resmem_ray.submit import submit

    try:
        status = submit(args.address, args.stage, args.stage_args, working_dir=args.working_dir,
                        env_file=args.runtime_env, wait=not args.no_wait)
    except ResMemError as e:
        print(f"resmem: error: {e}", file=sys.stderr)
        return 2
    return 0 if args.no_wait or status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
