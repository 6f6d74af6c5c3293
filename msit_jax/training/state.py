"""Train state, optimizer and model initialisation.

The state holds the three variable collections separately: only `params` is
optimised; `frozen` (RIM base kernels W) and `batch_stats` (BatchNorm running
statistics) ride along, so the frozen kernels can never be updated.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from msit_jax.geometry import QueryGeometry
from msit_jax.models.model import MSIT
from msit_jax.training.schedule import lr_schedule

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
    """step: () int32, the number of optimizer updates applied so far."""

    step: jax.Array
    params: PyTree
    frozen: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState

    def variables(self) -> dict:
        """The model's variables for `model.apply` (empty collections left out)."""
        v = {"params": self.params}
        if self.frozen:
            v["frozen"] = self.frozen
        if self.batch_stats:
            v["batch_stats"] = self.batch_stats
        return v


def make_optimizer(config: ml_collections.ConfigDict
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(Adam with the reference schedule, the schedule) for a training config.

    Adam as torch's defaults (b1 .9, b2 .999, eps 1e-8, no weight decay), after
    optional global-norm clipping.
    """
    lr = config.lr
    schedule = lr_schedule(lr.base, lr.multiplier, lr.warmup_steps, config.total_steps,
                           lr.epoch_steps)
    adam = optax.adam(schedule, b1=config.adam.b1, b2=config.adam.b2, eps=config.adam.eps)
    clip = float(config.grad_clip_norm or 0.0)
    if clip > 0:
        return optax.chain(optax.clip_by_global_norm(clip), adam), schedule
    return adam, schedule


def init_variables(model: MSIT, rng: jax.Array, inputs: tuple[np.ndarray, QueryGeometry]
                   ) -> dict:
    """Fresh variables {'params', 'frozen'?, 'batch_stats'?}, one jitted computation.

    inputs: (inp, geom), e.g. `msit_jax.models.model.dummy_inputs` of the training shapes."""
    return _jitted_init(model)(rng, *inputs)


def _jitted_init(model: MSIT):
    # On CPU the init is compiled without backend optimisation: XLA:CPU spends
    # seconds optimising each unrolled threefry generator (40 s for the tiny
    # model, 6 s at -O0) and the init runs once (so nothing is memoised here).
    # Values agree to 1 ulp.
    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(model.init, compiler_options=opts)


def create_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
    """A step-0 train state around given variables."""
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=variables.get("frozen", {}),
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
    )

