"""benchmarks/RESULTS.md: the header every section carries, and writing a script's own
section in place (a rerun replaces it; earlier results stay in git history) with the
index at the top. Imported by the scripts beside it (run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
import time
import uuid

from resmem_ray import versions

TITLE = "# Benchmark results"
PREAMBLE = ("Each script under `benchmarks/` writes its own section below, with the machine, the "
            "versions and the command that reproduces it. A rerun replaces the whole section, notes "
            "written under its tables included; earlier results stay in git history.")
SECTION = re.compile(r"<!-- section: (.+?) -->\n(.*?)<!-- end -->", re.S)


def machine() -> str:
    import torch

    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {total / 2**30:.0f} GiB, {gpu}"


def section(title: str, question: str, *intro: str) -> list[str]:
    """Title, the question the section answers, the date, the machine, the versions and
    the command that reproduces it."""
    command = shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])  # quoted: it pastes as it ran
    return [f"## {title}", "", f"Question: {question}", "",
            f"Run {time.strftime('%Y-%m-%d')} on {machine()}; versions: {versions()}.",
            f"Command: `{command}`", "", *intro]


def anchor(title: str) -> str:
    """The link GitHub gives a heading."""
    return "#" + re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def index(sections: dict[str, str]) -> list[str]:
    rows = ["| script | question | section |", "| --- | --- | --- |"]
    for key, body in sections.items():
        title = re.search(r"^## (.+)$", body, re.M)
        question = re.search(r"^Question: (.+)$", body, re.M)
        link = f"[{title[1]}]({anchor(title[1])})" if title else ""
        rows.append(f"| `{key}` | {question[1] if question else ''} | {link} |")
    return rows


def render(sections: dict[str, str]) -> str:
    return "\n".join([TITLE, "", PREAMBLE, "", *index(sections), ""] +
                      [f"<!-- section: {k} -->\n{body}\n\n<!-- end -->\n" for k, body in sections.items()])


def read_sections(path: str) -> dict[str, str]:
    """Each section's key and text, in the file's order (none when the file is new)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    found = SECTION.findall(text)
    if len(found) != text.count("<!-- section: "):
        print(f"{path}: a `<!-- section: ... -->` without its `<!-- end -->`; fix it, then rerun", file=sys.stderr)
        sys.exit(2)
    return {key: body.strip("\n") for key, body in found}


def write(path: str, lines: list[str], variant: str = "") -> None:
    """Replace this script's section of the results file at `path` (a script that measures
    several setups names each one's own section with `variant`), or add it at the end;
    then rewrite the index. The file is replaced whole, never half-written."""
    print("\n".join(lines))
    key = " ".join(filter(None, [os.path.basename(sys.argv[0]), variant]))
    sections = read_sections(path)
    sections[key] = "\n".join(lines).strip("\n")
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(render(sections))
    os.replace(tmp, path)
