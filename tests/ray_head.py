"""A real Ray head (`ray start --head --block`) on loopback, with token authentication,
its own ports and temp dir, stopped by killing its process group: never `ray stop`,
which would stop every Ray instance of this user on the machine."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
              "--node-manager-port", "--object-manager-port")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class RayHead:
    def __init__(self, num_cpus: float = 2, env: dict | None = None):
        # short path: Ray's unix sockets live under the temp dir (108-byte limit)
        self.temp_dir = tempfile.mkdtemp(prefix="rmh-", dir="/tmp")
        ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.gcs = f"127.0.0.1:{ports['--port']}"
        self.dashboard = f"http://127.0.0.1:{ports['--dashboard-port']}"
        # the client side needs exactly these two variables to authenticate
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0",
                    # a job's `python` is the cluster's: here, this venv's
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.update(env or {})
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}",
               "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items())]
        self.log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # own process group: stop kills only it
        try:
            self._wait_ready(timeout=120)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self.log_text()}")
            try:  # the jobs API answers only once the head is fully up
                req = urllib.request.Request(f"{self.dashboard}/api/jobs/",
                                             headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"Ray head not up after {timeout}s: {self.log_text()}")

    def log_text(self) -> str:
        return (Path(self.temp_dir) / "ray-start.log").read_text()[-3000:]

    def stop(self) -> None:
        """SIGTERM to `ray start --block` alone (it drains and stops its node: signalling the
        whole group at once kills the GCS it drains through), then SIGKILL to whatever is
        left of its process group, which holds only this head's processes."""
        pgid = self.proc.pid
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a drain after a test's killed drivers rarely ends
            pass
        deadline = time.time() + 3
        while time.time() < deadline and _group_alive(pgid):
            time.sleep(0.5)
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


class MotoS3:
    """moto's S3 server on loopback (a subprocess in its own process group) with one bucket.
    `uri(path)` is an s3:// run directory on it, in pyarrow's URI syntax."""

    CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

    def __init__(self, bucket: str = "resmem"):
        (port,) = free_ports(1)
        self.endpoint = f"127.0.0.1:{port}"
        self.bucket = bucket
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                      "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        try:
            deadline = time.time() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://{self.endpoint}/", timeout=2).close()
                    break
                except OSError:
                    if time.time() > deadline or self.proc.poll() is not None:
                        raise RuntimeError("moto_server did not start")
                    time.sleep(0.3)
            self.fs.create_dir(bucket)
        except BaseException:
            self.stop()
            raise

    @property
    def fs(self):
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(access_key="testing", secret_key="testing", endpoint_override=self.endpoint,
                                       scheme="http", region="us-east-1", allow_bucket_creation=True)

    def uri(self, path: str) -> str:
        return f"s3://{self.bucket}/{path}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"

    def read(self, path: str) -> bytes:
        with self.fs.open_input_stream(f"{self.bucket}/{path}") as f:
            return f.read()

    def list(self, path: str) -> list[str]:
        import pyarrow.fs

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(f"{self.bucket}/{path}", recursive=True,
                                                              allow_not_found=True))
        return sorted(i.path.split(f"{self.bucket}/{path}/", 1)[1] for i in infos if i.type == pyarrow.fs.FileType.File)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
