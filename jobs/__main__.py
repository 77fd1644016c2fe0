"""The Ray job entry point of every stage of the stage table and of `resmem run`:

    python -m jobs STAGE --config FILE [key=value ...]

(`ray job submit -- python -m jobs run --config ...`; `resmem submit` builds this line)."""

import sys

from resmem_ray.cli import main
from resmem_ray.submit import JOB_STAGES


def run_job(argv: list[str]) -> int:
    if not argv or argv[0] not in JOB_STAGES:
        print(f"usage: python -m jobs STAGE [--config FILE] [key=value ...] (STAGE: {' | '.join(JOB_STAGES)})",
              file=sys.stderr)
        return 2
    return main(argv)


if __name__ == "__main__":
    sys.exit(run_job(sys.argv[1:]))
