"""Transitional alias of `msit_jax.io.model_dir` (this module's old name).

Importers outside the rename's scope still say `msit_jax.io.checkpoint`; delete
this file once they import `msit_jax.io.model_dir`.
"""

import sys

from msit_jax.io import model_dir as _module

sys.modules[__name__] = _module
