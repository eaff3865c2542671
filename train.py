"""`python train.py --help`: the same program as `cnneb-train` (cnneb_jax/cli/train.py)."""

import sys

from cnneb_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
