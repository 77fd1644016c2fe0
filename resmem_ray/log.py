"""The run's own log lines, kept apart from Ray's.

One logger, `resmem`, writes `[stage] message` lines to stdout; the stage is a field of
the record, declared once per module (`log = stage_log("index")`), so a line reads the
same whichever stage or process calls the code that writes it. `Progress` throttles a
loop's lines. `verbose()` says whether Ray's own lines are wanted (`resmem ...
--verbose`); without it `quiet_ray_data` sends Ray Data's banners and progress to its
log file, in the driver and, as their setup hook, in Ray's workers.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

VERBOSE = "RESMEM_VERBOSE"  # an environment variable: it reaches Ray's local workers and subprocesses
RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")


class _Stdout(logging.StreamHandler):
    """sys.stdout as it is when a line is written: pytest's capture, a Ray worker's
    redirected stream."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


class _StageFormat(logging.Formatter):
    """`[stage] message`; a message's leading newlines stay before the prefix."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        stage = getattr(record, "stage", None)
        if not stage:
            return message
        text = message.lstrip("\n")
        return f"{message[:len(message) - len(text)]}[{stage}] {text}"


logger = logging.getLogger("resmem")
if not logger.handlers:
    _handler = _Stdout()
    _handler.setFormatter(_StageFormat())
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not through the root logger, whose level Ray sets in its workers


def stage_log(stage: str) -> logging.LoggerAdapter:
    """The logger for one stage's (or component's) lines: `[stage] message`."""
    return logging.LoggerAdapter(logger, {"stage": stage})


class Progress:
    """A loop's progress lines: at most one every `every` seconds, and always the last."""

    def __init__(self, log: logging.LoggerAdapter | logging.Logger, every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.log, self.every, self.clock = log, every, clock
        self.shown = clock()

    def __call__(self, message: str, last: bool = False) -> None:
        now = self.clock()
        if last or now - self.shown >= self.every:
            self.log.info(message)
            self.shown = now


def set_verbose(on: bool) -> None:
    os.environ[VERBOSE] = "1" if on else "0"


def verbose() -> bool:
    """Whether Ray's own log lines are wanted (`resmem ... --verbose`)."""
    return os.environ.get(VERBOSE) == "1"


def quiet_ray_data() -> None:
    """In this process, Ray Data's lines (execution banners and plans, progress, warnings)
    go to its log file (logs/ray-data/ray-data.log in the Ray session), not the console,
    and its progress is logged there instead of drawn as tqdm_ray's bars, whose escape
    codes a Ray worker would forward to the driver; Ray's own warnings that ask nothing of
    a user are dropped. A terminal still gets the driver's own progress bars. Also Ray's
    `worker_process_setup_hook` (cli.init_ray)."""
    os.environ.setdefault("RAY_TQDM", "0")
    # a false alarm of the actor pool on a split of few blocks (a short text split)
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
    # Ray Data sets its own deprecated option while planning a map: nothing a user can change
    warnings.filterwarnings("ignore", message="`ExecutionOptions.exclude_resources` is deprecated")
    # Ray Train's controller logs a traceback it calls safe to ignore when a busy CPU delays
    # its autoscaling request past 5 s (it asks again 20 s later)
    logging.getLogger("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client").setLevel(
        logging.ERROR)
    if RAY_DATA_LOGGING.is_file():  # read when ray.data configures its logger
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))
    if "ray.data" in sys.modules:  # configured at its import: change it in place
        import ray.data

        ray.data.DataContext.get_current().use_ray_tqdm = False
        for handler in logging.getLogger("ray.data").handlers:
            if handler.name == "console":
                handler.setLevel(logging.ERROR)  # as ray_data_logging.yaml
