"""Ray job entry point for `resmem memorize`: python -m jobs.memorize --config FILE --examples F.npz [key=value ...]"""

import sys

from resmem_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["memorize", *sys.argv[1:]]))
