"""The header every benchmarks/RESULTS.md section carries, and appending a section.
Imported by the scripts beside it (run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import os
import platform
import sys
import time

from resmem_ray import versions


def machine() -> str:
    import torch

    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {total / 2**30:.0f} GiB, {gpu}"


def section(title: str, *intro: str) -> list[str]:
    """Title with the date, the machine, the versions and the command that reproduces it."""
    command = " ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    return [f"\n## {title} ({time.strftime('%Y-%m-%d')})", "",
            f"Machine: {machine()}; versions: {versions()}.", f"Command: `{command}`", "", *intro]


def append(path: str, lines: list[str]) -> None:
    print("\n".join(lines))
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
