"""`python export.py --help`: the same program as `cnneb-export` (cnneb_jax/cli/export.py)."""

import sys

from cnneb_jax.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
