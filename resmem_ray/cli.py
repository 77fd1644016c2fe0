"""`resmem` command line: one subcommand per pipeline stage, and `run` for all of them.

    resmem run --config jobs/configs/digits.yaml train.epochs=5 run_dir=runs/d5

Connects to the Ray cluster in RAY_ADDRESS (set inside `ray job submit`), or starts a
local Ray instance. A user-facing problem exits with status 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import os
import sys

from resmem_ray.config import load_config
from resmem_ray.errors import ResMemError
from resmem_ray.pipeline import run_pipeline, run_stage
from resmem_ray.stage_table import STAGES


RUN_HELP = "all stages of the pipeline in order, skipping those whose outputs are current"
SUBMIT_USAGE = ("resmem submit [--address URL] [--runtime-env FILE] [--working-dir DIR] [--no-wait] "
                "STAGE [--config FILE] [key=value ...]")


def init_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resmem", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [(s.name, s.help) for s in STAGES.values()] + [("run", RUN_HELP)]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", help="YAML config (defaults: the digits run)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5")
        for flag, option_help in getattr(STAGES.get(name), "options", ()):
            p.add_argument(flag, required=True, help=option_help)
    p = sub.add_parser("submit", usage=SUBMIT_USAGE,
                       help="run a stage (or `run`) as a Ray job on a cluster, stream its logs, return its status")
    p.add_argument("--address", help="Ray dashboard / jobs address, e.g. http://127.0.0.1:8265 "
                   "(default: RAY_ADDRESS)")
    p.add_argument("--runtime-env", help="runtime-env YAML (pip, image_uri, env_vars), e.g. cluster/runtime_env.yaml")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working_dir (default: .)")
    p.add_argument("--no-wait", action="store_true", help="return once submitted")
    p.add_argument("stage", help=" | ".join([*STAGES, "run"]))
    p.add_argument("stage_args", nargs=argparse.REMAINDER, help="the stage's --config and overrides")
    args = parser.parse_args(argv)
    if args.command == "submit":
        return _submit(args)
    try:
        cfg = load_config(args.config, tuple(args.overrides))
        init_ray()
        if args.command == "run":
            run_pipeline(cfg)
        else:
            options = {flag.lstrip("-"): getattr(args, flag.lstrip("-")) for flag, _ in STAGES[args.command].options}
            run_stage(args.command, cfg, **options)
        if args.command in ("run", "evaluate") or (args.command == "tune" and cfg.tune.evaluate):
            from resmem_ray.store.rundir import RunDir

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
