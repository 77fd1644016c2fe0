"""Each `resmem` command talks to its own Ray instance only.

Ray code that looks an instance up by itself (the state API, which Ray Train's
placement-group cleaner and Ray Data's hang detector call from their own processes)
reads RAY_ADDRESS, or else takes the one instance running on the machine and fails
when there are several ("Found multiple active Ray instances"): a second `resmem run`,
a `resmem serve`, another user's notebook. So when a command starts its own instance,
it and every worker process of it name that instance in RAY_ADDRESS (`bind`, a worker
setup hook installed by cli.init_ray).
"""

from __future__ import annotations

import os

from resmem_ray.log import quiet_ray_data, verbose

BOUND = "RESMEM_OWN_RAY_ADDRESS"  # RAY_ADDRESS as `bind` set it, not as the user gave it
QUIET_SERVE = "RESMEM_QUIET_SERVE"  # "1": Serve's INFO lines stay in its log files (`resmem serve`)
SETUP_HOOK = f"{__name__}.setup_worker"


def bind() -> None:
    """Name this process's own Ray instance in RAY_ADDRESS."""
    import ray

    os.environ["RAY_ADDRESS"] = os.environ[BOUND] = ray.get_runtime_context().gcs_address


def local_instance() -> bool:
    """Whether this process's Ray instance is one the command started on this machine (no
    cluster was named in RAY_ADDRESS), so no node will join it."""
    address = os.environ.get("RAY_ADDRESS")
    return not address or address == os.environ.get(BOUND)


def setup_worker() -> None:
    """Ray's worker_process_setup_hook for a command's own instance (cli.init_ray)."""
    bind()
    if not verbose():
        quiet_ray_data()
    if os.environ.get(QUIET_SERVE) == "1":  # Serve sets its logger to INFO when imported: import it first
        import logging

        import ray.serve  # noqa: F401

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
