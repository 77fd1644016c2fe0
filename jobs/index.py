"""Ray job entry point for `resmem index`: python -m jobs.index --config FILE [key=value ...]"""

import sys

from resmem_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
