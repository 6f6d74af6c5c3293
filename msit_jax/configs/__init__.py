"""The training configs (ml_collections `get_config()` files), shipped in the package.

    msit-train --config default --workdir runs/default             # a name
    msit-train --config configs/default.py --workdir runs/default  # a path (a checkout)

Each NAME.py here defines `get_config()`; `msit-train --config NAME` (or the
repository's `configs/NAME.py`, a link to this folder, so there is one copy of
each file) loads it. `resolve` maps a --config value to the file to load: an
existing path always wins; otherwise a known name (`default`, `msit_edsr_stage1`),
or a path that does not exist whose file name is a known config
(`configs/default.py` run outside a checkout), is this folder's file.
"""

from __future__ import annotations

import os

DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The packaged config names, sorted (`default`, `msit_edsr_stage1`, ...)."""
    return sorted(f[:-3] for f in os.listdir(DIR)
                  if f.endswith(".py") and not f.startswith("_"))


def path(name: str) -> str:
    """The file of the packaged config `name`; KeyError listing the names if unknown."""
    if name not in names():
        raise KeyError(f"no packaged config {name!r}; the configs are: {', '.join(names())}")
    return os.path.join(DIR, f"{name}.py")


def resolve(value: str) -> str:
    """The config file a --config value names: `value` itself when it exists (or when
    nothing packaged matches it: the loader then reports the missing file), else the
    packaged file of that name (`default`, `default.py`, `configs/default.py`)."""
    if os.path.exists(value):
        return value
    stem = os.path.basename(value)
    stem = stem[:-3] if stem.endswith(".py") else stem
    return os.path.join(DIR, f"{stem}.py") if stem in names() else value
