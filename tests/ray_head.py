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
    def __init__(self, num_cpus: float = 2):
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
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + 10
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
