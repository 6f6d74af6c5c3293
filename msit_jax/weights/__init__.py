"""Weights that ship inside the package, by name.

    from msit_jax import weights
    weights.available()                 # ['msit-lite']
    weights.weights_path("msit-lite")   # .../msit_jax/weights/msit-lite.safetensors
    weights.card_path("msit-lite")      # .../msit_jax/weights/msit-lite.md (the model card)

`msit_jax.io.pretrained.load("msit-lite")` and `Upscaler.from_pretrained("msit-lite")`
resolve these names when no file or folder of that name exists (a real path
always wins). Each model is one `.safetensors` file (read with numpy: no extra
package needed) and its model card; `benchmarks/bundle_weights.py` writes both
from a training workdir.
"""

from __future__ import annotations

import os

# name -> one-line description. The files are NAME.safetensors and NAME.md beside this module.
BUNDLED: dict[str, str] = {
    "msit-lite": "small EDSR-baseline MSIT (stage 1, plain convs), trained on the 291 set "
                 "(T91 + BSD200), bicubic degradation",
}
DEFAULT = "msit-lite"  # what msit-upscale and the web demo use without --checkpoint
WEIGHTS_SUFFIX, CARD_SUFFIX = ".safetensors", ".md"
HERE = os.path.dirname(os.path.abspath(__file__))


class UnknownModelError(FileNotFoundError):
    """A name that is neither an existing path nor a bundled model; the message lists them."""


def available() -> list[str]:
    """The bundled model names (sorted)."""
    return sorted(BUNDLED)


def is_bundled(name: str) -> bool:
    return name in BUNDLED


def _check(name: str) -> None:
    if name not in BUNDLED:
        raise UnknownModelError(f"unknown bundled model {name!r}: available: "
                                f"{', '.join(available())}")


def weights_path(name: str) -> str:
    """The .safetensors file of bundled model `name`; UnknownModelError (one line naming
    the available models) for another name, FileNotFoundError if the file is missing
    from this installation."""
    _check(name)
    path = os.path.join(HERE, name + WEIGHTS_SUFFIX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"bundled model {name!r}: {path} is missing from this "
                                "installation (reinstall msit-jax)")
    return path


def card_path(name: str) -> str:
    """The model card (Markdown) of bundled model `name`."""
    _check(name)
    return os.path.join(HERE, name + CARD_SUFFIX)
