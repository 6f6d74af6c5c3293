"""`msit_jax.reparam` is `msit_jax.models.reparam` (the README's public name)."""

import sys

from msit_jax.models import reparam as _module

sys.modules[__name__] = _module
