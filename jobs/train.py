"""Ray job entry point for `resmem train`: python -m jobs.train --config FILE [key=value ...]"""

import sys

from resmem_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
