"""msit-jax: the Multi-Scale Implicit Transformer (MSIT) for arbitrary-scale SR in JAX/Flax."""

from msit_jax.config import model_config, tiny_model_config
from msit_jax.model import MSIT, build_model

__all__ = ["MSIT", "build_model", "model_config", "tiny_model_config"]
__version__ = "0.1.0"
