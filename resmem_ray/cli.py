"""`resmem` command line: one subcommand per pipeline stage, and `run` for all of them.

    resmem run --config jobs/configs/digits.yaml train.epochs=5 run_dir=runs/d5

Connects to the Ray cluster in RAY_ADDRESS (set inside `ray job submit`), or starts a
local Ray instance of its own. A user-facing problem exits with status 2 and one line
naming it.
"""

from __future__ import annotations

import argparse
import os
import sys

from resmem_ray.config import load_config
from resmem_ray.errors import ResMemError
from resmem_ray.log import quiet_ray_data, set_verbose
from resmem_ray.pipeline import enabled, run_pipeline, run_stage
from resmem_ray.runtime import instance
from resmem_ray.stage_table import STAGES
from resmem_ray.store.remote import source_digest
from resmem_ray.store.rundir import RunDir


RUN_HELP = "all stages of the pipeline in order, skipping those whose outputs are current"
SUBMIT_USAGE = ("resmem submit [--address URL] [--runtime-env FILE] [--working-dir DIR] [--no-wait] "
                "STAGE [--config FILE] [key=value ...]")


def init_ray(verbose: bool = False) -> None:
    """Connect to RAY_ADDRESS's cluster or start a local instance. Ray's own INFO lines
    (start-up, per-report checkpoint lines, Ray Data's banners and progress bars) go to
    its log files; `--verbose` shows them."""
    import logging

    import ray

    set_verbose(verbose)
    if not verbose:
        quiet_ray_data()
    if ray.is_initialized():
        return
    quiet = None if verbose else ray.LoggingConfig(log_level="WARNING")
    if not verbose:  # "token authentication is enabled": Ray's default, said at every start
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    address = os.environ.get("RAY_ADDRESS") or None
    # without a cluster address: this command's own instance, which every process of it
    # names in RAY_ADDRESS (runtime/instance.py), never another instance on the machine;
    # on a cluster, the workers only keep Ray Data's lines to its log file
    hook = instance.SETUP_HOOK if not address else None if verbose else "resmem_ray.log.quiet_ray_data"
    runtime_env = {"worker_process_setup_hook": hook} if hook else {}
    if not address:  # one node, drained by nobody: Train's preemption watcher has nothing to watch, and
        # its creation (restartable, constructor arguments in the object store) logs an ERROR line every fit
        runtime_env["env_vars"] = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    ray.init(address=address, log_to_driver=True, logging_config=quiet, runtime_env=runtime_env or None)
    if not address:
        instance.bind()
    if not verbose:
        for name in ("ray", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)


def preflight(command: str, cfg, run: RunDir) -> None:
    """The cheap checks, before Ray starts: the inputs the command reads are finished
    (the nearest first), and the run directory may be written."""
    if command in ("run", "train") and cfg.model.source != "trained":
        source_digest(cfg.model.path)  # the given model or embeddings exist
    if command == "sweep":
        from resmem_ray.stages.sweep import check_sweepable

        check_sweepable(cfg)
    if command != "run":
        stage = STAGES[command]
        for name in reversed(stage.reads):
            if enabled(STAGES[name], cfg):
                run.stage_output(name, needed_by=command)
    run.claim()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resmem", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [(s.name, s.help) for s in STAGES.values()] + [("run", RUN_HELP)]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", help="YAML config (defaults: the digits run)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5")
        p.add_argument("--verbose", action="store_true", help="also show Ray's own log lines")
        for flag, option_help in getattr(STAGES.get(name), "options", ()):
            p.add_argument(flag, required=True, help=option_help)
    p = sub.add_parser("status", help="a run's stages: done / running / stale and why, durations, output sizes")
    p.add_argument("--config", help="YAML config to compare the run with (default: the run's own)")
    p.add_argument("run_and_overrides", nargs="+", metavar="RUN [key=value ...]",
                   help="the run directory (a path or URI), then dotted overrides of the config compared with")
    p = sub.add_parser("predict", help="send examples to a `resmem serve` application, print its answers as a table")
    p.add_argument("--url", required=True, help="the application, e.g. http://127.0.0.1:8000")
    p.add_argument("files", nargs="+", metavar="FILE", help=".png images, an .npz of images (N, C, H, W) uint8, "
                   "or a text file (text runs), one example a line")
    p = sub.add_parser("submit", usage=SUBMIT_USAGE,
                       help="run a stage (or `run`) as a Ray job on a cluster, stream its logs, return its status")
    p.add_argument("--address", help="Ray dashboard / jobs address, e.g. http://127.0.0.1:8265 "
                   "(default: RAY_ADDRESS)")
    p.add_argument("--runtime-env", help="runtime-env YAML (pip, image_uri, env_vars), e.g. cluster/runtime_env.yaml")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working_dir (default: .)")
    p.add_argument("--no-wait", action="store_true", help="return once submitted")
    p.add_argument("stage", help=" | ".join([*STAGES, "run"]))
    p.add_argument("stage_args", nargs=argparse.REMAINDER, help="the stage's --config and overrides")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "status":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "status":  # RUN, then overrides, on either side of --config
        args.run_and_overrides += extra
    if args.command == "submit":
        return _submit(args)
    if args.command == "predict":
        from resmem_ray.client import predict, table

        try:
            print(table(predict(args.url, args.files)))
        except ResMemError as e:
            print(f"resmem: error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        if args.command == "status":
            from resmem_ray.status import print_status

            print_status(args.run_and_overrides[0], args.config, tuple(args.run_and_overrides[1:]))
            return 0
        cfg = load_config(args.config, tuple(args.overrides))
        run = RunDir(cfg.run_dir)
        preflight(args.command, cfg, run)
        if args.command == "serve" and cfg.serve.direct_ingress:
            os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # read by the Ray instance it starts
            # no load balancer in front to drain for: Ctrl-C stops at once, not after 30 s
            os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
        # `resmem serve` on its own instance: Serve's workers keep their INFO lines (a 9-line
        # banner) to its log files; a job's driver keeps its job's runtime env
        quiet_serve = args.command == "serve" and not args.verbose and not os.environ.get("RAY_ADDRESS")
        with run.lock(" ".join(["resmem", *(argv if argv is not None else sys.argv[1:])])):
            if quiet_serve:
                os.environ[instance.QUIET_SERVE] = "1"  # read by the workers' setup hook
            init_ray(args.verbose)
            if args.command == "run":
                run_pipeline(cfg)
            else:
                options = {flag.lstrip("-"): getattr(args, flag.lstrip("-"))
                           for flag, _ in STAGES[args.command].options}
                run_stage(args.command, cfg, **options)
        if args.command in ("run", "evaluate") or (args.command == "tune" and cfg.tune.evaluate):
            print(run.report.joinpath("report.md").read_text())
    except ResMemError as e:
        cause = getattr(e, "cause", None) or e  # errors raised inside Ray tasks arrive wrapped
        print(f"resmem: error: {cause}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk, a missing file: one line, not a traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"resmem: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C; for `resmem serve` SIGTERM too (stages/serve.py: Terminated)
        if args.command == "serve":
            print("resmem: serve stopped", file=sys.stderr)
        else:
            print("resmem: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        return getattr(e, "exit_code", 130)
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
