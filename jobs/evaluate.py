"""Ray job entry point for `resmem evaluate`: python -m jobs.evaluate --config FILE [key=value ...]"""

import sys

from resmem_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
