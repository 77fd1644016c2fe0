"""Ray job entry point for `resmem transformer`: python -m jobs.transformer --config FILE [key=value ...]"""

import sys

from resmem_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["transformer", *sys.argv[1:]]))
