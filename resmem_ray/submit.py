"""`resmem submit`: run a stage or the whole pipeline as a Ray job on a cluster.

    resmem submit --address http://127.0.0.1:8265 run --config jobs/configs/cifar10.yaml run_dir=s3://b/c10

Submits `python -m jobs STAGE ARGS` (jobs/__main__.py) through the Ray Jobs API (JobSubmissionClient) with
a runtime_env whose working_dir is this checkout (uploaded by Ray, so `resmem_ray` and
`jobs` import on every node) merged with an optional runtime-env YAML (pip, image_uri,
env_vars), streams the job's logs and returns its final status. Token authentication
(Ray's default) reads the token as every Ray client does: RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from resmem_ray.config import load_config, read_yaml_mapping
from resmem_ray.errors import ResMemError
from resmem_ray.log import stage_log
from resmem_ray.stage_table import STAGES
from resmem_ray.store.remote import is_uri

log = stage_log("submit")

JOB_STAGES = (*STAGES, "run")  # what `python -m jobs STAGE` runs
# Never uploaded with the working_dir (Ray also honours .gitignore): build outputs, and
# secrets (credentials, keys, env files) that a checkout may hold. docs/operating.md lists them.
EXCLUDES = [".venv", ".git", "runs", "*.egg-info", ".pytest_cache", "__pycache__",
            ".env", ".env.*", ".envrc", ".aws", ".ssh", ".gnupg", ".netrc", ".git-credentials", ".npmrc", ".pypirc",
            ".docker", ".kube", "secrets", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_dsa*", "id_ecdsa*",
            "id_ed25519*", "credentials.json", "*.tfstate", "*.tfvars"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def runtime_env(working_dir: str, env_file: str | None) -> dict:
    """working_dir + excludes, merged with the runtime-env YAML (its keys win)."""
    env: dict = {}
    if env_file:
        env = read_yaml_mapping(env_file, "runtime env file")
        if sum(k in env for k in ("pip", "uv", "conda")) > 1:
            raise ResMemError(f"runtime env file {env_file}: pip, uv and conda cannot be combined")
    if not (Path(working_dir) / "jobs").is_dir():
        raise ResMemError(f"--working-dir {working_dir} has no jobs/ folder: run from the resmem-ray checkout")
    env.setdefault("working_dir", str(working_dir))
    env["excludes"] = sorted(set(env.get("excludes", [])) | set(EXCLUDES))
    return env


def check_run_dir(stage_args: list[str]) -> None:
    """A relative local run_dir would land in the job's throwaway working directory."""
    config = None
    overrides = []
    args = iter(stage_args)
    for a in args:
        if a == "--config":
            config = next(args, None)
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif a.startswith("--"):
            if "=" not in a:
                next(args, None)  # the option's value (memorize --examples FILE)
        else:
            overrides.append(a)
    run_dir = load_config(config, tuple(overrides)).run_dir  # also fails early on a bad config
    if not is_uri(run_dir) and not os.path.isabs(run_dir):
        raise ResMemError(f"run_dir={run_dir!r} is relative: on the cluster it would be inside the job's "
                          "temporary working directory. Give an absolute path on shared storage or a URI "
                          "(s3://, gs://), e.g. run_dir=s3://bucket/runs/name")


def submit(address: str | None, stage: str, stage_args: list[str], working_dir: str = ".",
           env_file: str | None = None, wait: bool = True, entrypoint_num_cpus: float = 0) -> str:
    """Submit `python -m jobs STAGE ...`; stream its logs; return the final status."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if stage not in JOB_STAGES:
        raise ResMemError(f"unknown stage {stage!r} (choose from {', '.join(JOB_STAGES)})")
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ResMemError("no cluster address: pass --address http://HEAD:8265 (e.g. through `ray dashboard "
                          "cluster.yaml` or a port-forward) or set RAY_ADDRESS")
    check_run_dir(stage_args)
    env = runtime_env(working_dir, env_file)
    entrypoint = " ".join(["python", "-m", "jobs", stage, *(_quote(a) for a in stage_args)])
    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env,
                                   entrypoint_num_cpus=entrypoint_num_cpus)
    except AuthenticationError as e:
        raise ResMemError(f"could not submit to the Ray cluster at {address}: {str(e).strip().splitlines()[0]} "
                          "(set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH, to the cluster's token: "
                          "`ray get-auth-token` on the head)") from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ResMemError(f"could not submit to the Ray cluster at {address}: {str(e).strip().splitlines()[0]}") \
            from None
    log.info(f"job {job_id}: {entrypoint}")
    if not wait:
        log.info(f"follow it with: ray job logs --follow --address {address} {job_id}")
        return str(client.get_job_status(job_id))
    try:
        asyncio.run(_stream(client, job_id))
    except KeyboardInterrupt:
        log.info(f"\nstopped following; job {job_id} keeps running "
                 f"(stop it with: ray job stop --address {address} {job_id})")
        raise
    status = client.get_job_status(job_id)
    while str(status) not in TERMINAL:  # the log stream can end a moment before the status
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    info = client.get_job_info(job_id)
    log.info(f"job {job_id}: {status}" + (f" ({info.message})" if info.message else ""))
    return str(status)


async def _stream(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
