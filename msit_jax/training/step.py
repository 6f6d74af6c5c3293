"""The jitted, data-parallel train step.

One `jax.jit` over a 1-D Mesh of every device (all hosts): the batch is
sharded along axis 'data', the train state replicated. XLA inserts the
gradient all-reduce; BatchNorm statistics are means over the *global* batch
(as the reference on one GPU), so results do not depend on the device count
beyond float round-off. No pmap.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msit_jax.data.lean import LeanBatch, expand
from msit_jax.data.protocol import Batch
from msit_jax.models.encoders import encoder_dropout
from msit_jax.models.model import MSIT
from msit_jax.training.state import TrainState

DATA_AXIS = "data"
# Bits of the step's `nonfinite` metric: which quantity was NaN or infinite.
NONFINITE_LOSS, NONFINITE_GRADS, NONFINITE_WEIGHTS = 1, 2, 4
NONFINITE_NAMES = ((NONFINITE_LOSS, "loss"), (NONFINITE_GRADS, "gradients"),
                   (NONFINITE_WEIGHTS, "updated weights"))


def describe_nonfinite(code: int) -> str:
    """'loss, gradients and updated weights' for a `nonfinite` bit mask."""
    names = [n for bit, n in NONFINITE_NAMES if code & bit]
    if not names:
        return "nothing"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def all_finite(tree: Any) -> jax.Array:
    """() bool: every floating-point value of a pytree is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over all devices (process-major order, as jax.devices())."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def l1_loss(pred: jax.Array, gt: jax.Array) -> jax.Array:
    """Mean absolute error over (B, Q, 3), torch.nn.L1Loss()."""
    return jnp.mean(jnp.abs(pred - gt))


def dropout_rng(seed: int, step: jax.Array) -> jax.Array:
    """The 'dropout' rng of a stochastic encoder (SwinIR's drop path) at `step`: a
    function of (run seed, step) only, so a resumed run draws what the uninterrupted
    one did and two seeds draw different masks. Seed 0 gives the key every run used
    before the seed was threaded through (PRNGKey(0) folded with the step)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def train_step(model: MSIT, tx: optax.GradientTransformation, schedule: optax.Schedule,
               state: TrainState, batch: Batch | LeanBatch, skip_nonfinite: bool = False,
               seed: int = 0) -> tuple[TrainState, dict]:
    """One Adam update on a batch (`msit_jax.data.protocol.Batch`: inp (B, h, h, 3),
    geometry (coord (B, Q, 2), ...), gt (B, Q, 3)), or on a `msit_jax.data.lean.LeanBatch`,
    expanded here into the identical Batch (gathers only: exact under jit).

    metrics: loss, lr, grad_norm (scalars) and nonfinite, an int32 bit mask of
    NONFINITE_* (0: loss, gradients and updated weights all finite). With
    skip_nonfinite, a step whose mask is not 0 changes nothing but the step
    counter (weights, BatchNorm statistics and Adam state keep their values).
    seed: the run's seed (config.seed), the root of a stochastic encoder's rng.
    """
    if isinstance(batch, LeanBatch):
        batch = expand(batch)

    def loss_fn(params):
        variables = state.replace(params=params).variables()
        mutable = ["batch_stats"] if state.batch_stats else []
        rngs = ({"dropout": dropout_rng(seed, state.step)}
                if encoder_dropout(model.cfg) else None)
        pred, updates = model.apply(variables, batch.inp, batch.geometry, train=True,
                                    mutable=mutable, rngs=rngs)
        return l1_loss(pred, batch.gt), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, param_updates),
        batch_stats=updates.get("batch_stats", state.batch_stats),
        opt_state=opt_state,
    )
    grad_norm = optax.tree.norm(grads)
    weights_ok = all_finite((new_state.params, new_state.batch_stats))
    nonfinite = (jnp.where(jnp.isfinite(loss), 0, NONFINITE_LOSS)
                 | jnp.where(jnp.isfinite(grad_norm), 0, NONFINITE_GRADS)
                 | jnp.where(weights_ok, 0, NONFINITE_WEIGHTS)).astype(jnp.int32)
    if skip_nonfinite:
        ok = nonfinite == 0
        kept = jax.tree_util.tree_map(lambda new, old: jnp.where(ok, new, old),
                                      new_state.replace(step=state.step), state)
        new_state = kept.replace(step=state.step + 1)
    metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": grad_norm,
               "nonfinite": nonfinite}
    return new_state, metrics


def lean_sharding(mesh: Mesh) -> LeanBatch:
    """A LeanBatch of shardings: the examples split over 'data', the table replicated."""
    data = batch_sharding(mesh)
    return LeanBatch(data, data, data, replicated(mesh))


def jit_train_step(model: MSIT, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   mesh: Mesh, skip_nonfinite: bool = False, seed: int = 0
                   ) -> Callable[[TrainState, Batch | LeanBatch], tuple[TrainState, dict]]:
    """train_step jitted with explicit shardings; the old state's buffers are donated.
    seed: the run's seed (config.seed; a Python int, a constant of the compiled step).

    The step takes a `Batch` or a `LeanBatch` (each its own jitted program, compiled
    on first use: a run feeds one kind).

    A new function each call: a run builds it once and calls it every step, so
    it compiles once per run.
    """

    def step(state, batch):
        return train_step(model, tx, schedule, state, batch, skip_nonfinite, seed)

    out = (replicated(mesh), replicated(mesh))
    full = jax.jit(step, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                   out_shardings=out, donate_argnums=(0,))
    lean = jax.jit(step, in_shardings=(replicated(mesh), lean_sharding(mesh)),
                   out_shardings=out, donate_argnums=(0,))

    def dispatch(state: TrainState, batch: Batch | LeanBatch) -> tuple[TrainState, dict]:
        return (lean if isinstance(batch, LeanBatch) else full)(state, batch)

    return dispatch


def to_host(tree: Any) -> Any:
    """Replicated (possibly multi-host) arrays -> numpy, from this host's first shard."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree_util.tree_map(get, tree)
