"""`python -m msit_jax.inference`: the msit-upscale command."""

import sys

from msit_jax.inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
