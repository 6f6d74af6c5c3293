"""`msit_jax.pretrained` is `msit_jax.io.pretrained` (the README's public name)."""

import sys

from msit_jax.io import pretrained as _module

sys.modules[__name__] = _module
