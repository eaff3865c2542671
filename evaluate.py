"""`python evaluate.py --help`: the same program as `cnneb-evaluate` (cnneb_jax/cli/evaluate.py)."""

import sys

from cnneb_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
