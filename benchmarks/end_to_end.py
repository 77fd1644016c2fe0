"""Wall time of each stage of a whole pipeline run, read from the run's manifest.

    python benchmarks/end_to_end.py --config jobs/configs/digits.yaml

Runs `resmem run` in a fresh process (a new local Ray instance, as a user would) into a
temporary run directory, then writes the stage times to its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import section, write


QUESTION = "How long does each stage of the digits pipeline take, and the whole command?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="jobs/configs/digits.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "resmem_ray.cli", "run", "--config", args.config,
                        *args.overrides, f"run_dir={d}/run"], check=True, capture_output=True)
        total = time.perf_counter() - t0
        manifest = json.loads(Path(d, "run", "manifest.json").read_text())
    stages = {s: manifest["stages"][s]["seconds"] for s in ("train", "embed", "index", "evaluate")}
    acc = manifest["stages"]["evaluate"]["accuracy"]
    lines = section("End to end", QUESTION, "| stage | seconds |", "| --- | ---: |")
    lines += [f"| {s} | {t:.1f} |" for s, t in stages.items()]
    lines += [f"| whole command (Ray start-up and imports included) | {total:.1f} |", "",
              f"Test accuracy: base {100 * acc['base']:.2f}%, ResMem {100 * acc['resmem']:.2f}%."]
    write(args.out, lines)


if __name__ == "__main__":
    main()
