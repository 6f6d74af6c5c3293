"""`python -m msit_jax.convert` runs `msit_jax.io.convert` (the README's public command)."""

import sys

from msit_jax.io import convert as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
