"""`python -m msit_jax.export`: the msit-export command."""

import sys

from msit_jax.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
