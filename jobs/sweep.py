"""Ray job entry point for `resmem sweep`: python -m jobs.sweep --config FILE [key=value ...]"""

import sys

from resmem_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
