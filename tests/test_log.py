"""The run's own log lines (resmem_ray/log.py) and how Ray's are kept out of them."""

import os
import subprocess
import sys

from resmem_ray import cli
from resmem_ray.log import Progress, logger, quiet_ray_data, set_verbose, stage_log, verbose
from resmem_ray.runtime import instance


def test_lines_carry_their_stage_and_reach_the_current_stdout(capsys):
    stage_log("index").info("552 rows x 32 dims")
    logger.info("== index done in 0.1s ==")
    stage_log("submit").info("\nstopped following; 100% {sure}")
    assert capsys.readouterr().out == ("[index] 552 rows x 32 dims\n== index done in 0.1s ==\n"
                                       "\n[submit] stopped following; 100% {sure}\n")


def test_progress_shows_a_line_every_few_seconds_and_the_last(capsys):
    now = [0.0]
    progress = Progress(stage_log("lookup"), every=5.0, clock=lambda: now[0])
    for done in range(1, 11):
        now[0] = done * 1.5  # a batch every 1.5 s
        progress(f"{done}/10 queries", last=done == 10)
    assert capsys.readouterr().out.splitlines() == ["[lookup] 4/10 queries", "[lookup] 8/10 queries",
                                                    "[lookup] 10/10 queries"]
    Progress(stage_log("lookup"), clock=lambda: 0.0)("0/0 queries", last=True)
    assert capsys.readouterr().out == "[lookup] 0/0 queries\n"


def test_verbose_is_set_once_and_read_anywhere(monkeypatch):
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "RESMEM_VERBOSE"})
    assert not verbose()
    set_verbose(True)
    assert verbose()
    set_verbose(False)
    assert not verbose()


def test_ray_workers_get_the_quiet_setup_hook(monkeypatch):
    """On a cluster the hook only quiets Ray Data (none with --verbose); on the command's own
    instance it is runtime/instance.py's, which also quiets Ray Data unless --verbose."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(os, "environ", {**os.environ, "RAY_ADDRESS": "10.0.0.1:6379"})  # init_ray sets RESMEM_VERBOSE
    cli.init_ray(False)
    cli.init_ray(True)
    quiet, loud = calls
    module, _, function = quiet["runtime_env"]["worker_process_setup_hook"].rpartition(".")
    assert getattr(__import__(module, fromlist=[function]), function) is quiet_ray_data
    assert loud["runtime_env"] is None and loud["logging_config"] is None

    quieted = []
    monkeypatch.setattr(instance, "bind", lambda: None)
    monkeypatch.setattr(instance, "quiet_ray_data", lambda: quieted.append(verbose()))
    del os.environ["RAY_ADDRESS"]
    cli.init_ray(False)
    # the command's own instance: one node that nobody drains, so no Ray Train preemption
    # watcher (a cluster keeps it)
    assert calls[-1]["runtime_env"] == {"worker_process_setup_hook": instance.SETUP_HOOK,
                                        "env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}}
    assert "env_vars" not in quiet["runtime_env"]
    instance.setup_worker()
    set_verbose(True)
    instance.setup_worker()
    assert quieted == [False]


def test_ray_data_banners_go_to_its_log_file_not_the_console():
    """What the setup hook does in a fresh Ray worker: Ray Data's banners and warnings reach
    only its log file (errors the console too), and its progress is not tqdm_ray's."""
    code = ("import logging; from resmem_ray.log import quiet_ray_data; quiet_ray_data(); import ray.data; "
            "log = logging.getLogger('ray.data'); "
            "log.info('Starting execution of Dataset x'); log.warning('careful'); log.error('broken'); "
            "print({h.name: logging.getLevelName(h.level) for h in log.handlers}, "
            "ray.data.DataContext.get_current().use_ray_tqdm)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_DATA_", "RAY_TQDM"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Starting execution" not in out.stderr and "careful" not in out.stderr and "broken" in out.stderr
    assert out.stdout.strip() == "{'file': 'NOTSET', 'console': 'ERROR'} False"
