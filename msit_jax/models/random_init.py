"""Random model weights for tests and benchmarks (not for training)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from msit_jax.models.model import variable_shapes


def random_variables(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> dict:
    """Random variables for a model config, as numpy.

    Shapes come from `jax.eval_shape` of the model's init; values from numpy.
    (Flax's own init compiles one random-number program per tensor shape, which
    costs XLA:CPU seconds each; tests and benchmarks need random weights,
    not that init.)
    BatchNorm statistics and biases are non-trivial so every term matters.
    """
    rs = np.random.RandomState(seed)

    def fill(path, shape):
        names = [getattr(p, "key", "") for p in path]
        leaf, parent = names[-1], names[-2] if len(names) > 1 else ""
        if names[0] == "batch_stats":
            return rs.uniform(0.5, 2.0, shape) if leaf == "var" else rs.normal(0, 0.3, shape)
        if parent == "bn":
            return rs.uniform(0.5, 1.5, shape) if leaf == "scale" else rs.normal(0, 0.1, shape)
        if leaf == "bias":
            return rs.normal(0, 0.1, shape)
        if leaf == "convmap":
            return rs.normal(0, 0.3, shape)
        if leaf == "scale":  # RIM per-2-D-kernel factor
            return rs.normal(0, 0.5, shape)
        fan_in = int(np.prod(shape[:-1]))
        # gain 0.5 keeps activations O(1) through deep residual stacks and the
        # gating products, so float32 comparisons stay well conditioned
        return rs.normal(0, 0.5 / np.sqrt(fan_in), shape)

    shapes = variable_shapes(model_cfg)
    return jax.tree_util.tree_map_with_path(
        lambda p, s: fill(p, s).astype(np.float32), shapes,
        is_leaf=lambda x: isinstance(x, tuple))
