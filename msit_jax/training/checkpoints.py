"""Training checkpoints: Orbax CheckpointManager over (train state, data iterator state).

Layout of a training workdir:
  WORKDIR/config.json          the full training config (for reference)
  WORKDIR/model_config.json    the model config (to rebuild the model)
  WORKDIR/checkpoints/<step>/  state/ (Orbax tree of TrainState), data/ (grain
                               iterator state, one JSON per process), metrics/
  WORKDIR/metrics.jsonl, WORKDIR/tensorboard/   logs (see `metrics`)

Retention: the last `keep` checkpoints plus the best one by validation PSNR.
Saves are asynchronous (training goes on while files are written); a crash
mid-save leaves a temporary directory Orbax ignores, never a half checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from msit_jax import checkpoint as model_checkpoint

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = model_checkpoint.CONFIG_FILE
BEST_METRIC = "val_psnr"


class IteratorSnapshot:
    """A grain iterator state captured at save time.

    The live iterator runs ahead of training (prefetch), and an async save may
    serialise later; the snapshot pins the state of the last batch trained on.
    Implements what grain's Orbax handler calls (get_state/set_state/start_prefetch).
    """

    def __init__(self, state: Optional[dict] = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state.decode())

    def start_prefetch(self) -> None:
        pass


class _NoMetricsWarningFilter(logging.Filter):
    """Orbax warns on every save without metrics when best-checkpoint tracking is on;
    only validation steps carry metrics here, by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "tracked_metric" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMetricsWarningFilter())


def _best_fn(metrics: dict) -> float:
    return float(metrics[BEST_METRIC])


def is_training_workdir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE))
            and os.path.isdir(os.path.join(path, CHECKPOINT_DIR)))


class Checkpointer:
    """Save / restore train state + data iterator state in WORKDIR/checkpoints."""

    def __init__(self, workdir: str, keep: int = 3, keep_best: bool = True,
                 async_save: bool = True, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        policies = [pp.LatestN(keep)]
        if keep_best:
            policies.append(pp.BestN(get_metric_fn=_best_fn, n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            best_fn=_best_fn, best_mode="max",
            enable_async_checkpointing=async_save, read_only=read_only,
            create=not read_only)
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        """The step with the highest validation PSNR, or None when none was validated."""
        return self.manager.best_step()

    def save(self, step: int, state: Any, data_state: Optional[dict],
             metrics: Optional[dict] = None) -> None:
        items = dict(state=ocp.args.StandardSave(state))
        if data_state is not None:
            items["data"] = grain.checkpoint.CheckpointSave(IteratorSnapshot(data_state))
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any, with_data: bool = True
                ) -> tuple[Any, Optional[dict]]:
        """(state placed as abstract_state's shardings, data iterator state or None)."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        snap = IteratorSnapshot()
        if with_data:
            items["data"] = grain.checkpoint.CheckpointRestore(snap)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], snap.state

    def restore_variables(self, step: int) -> dict:
        """The model variables of a checkpoint as saved (no optimizer state needed)."""
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        st = out["state"]
        return {k: st[k] for k in ("params", "frozen", "batch_stats") if st.get(k)}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def write_configs(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Write config.json and model_config.json (process 0 only)."""
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
        f.write(model_checkpoint.config_to_json(config.model))


def load_workdir_model(workdir: str, which: str = "best"
                       ) -> tuple[ml_collections.ConfigDict, dict]:
    """(model_cfg, numpy variables) of a training workdir's checkpoint.

    which: 'best' (highest validation PSNR; the latest when nothing was
    validated), 'latest', or a step number.
    """
    import numpy as np

    if not is_training_workdir(workdir):
        raise FileNotFoundError(f"{workdir} is not a msit-jax training workdir (expected "
                                f"{MODEL_CONFIG_FILE} and {CHECKPOINT_DIR}/ inside)")
    with open(os.path.join(workdir, MODEL_CONFIG_FILE)) as f:
        model_cfg = model_checkpoint.config_from_json(f.read())
    ckpt = Checkpointer(workdir, read_only=True, async_save=False)
    try:
        steps = ckpt.manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"{workdir}: no finished checkpoint in {CHECKPOINT_DIR}/")
        if which == "latest":
            step = ckpt.latest_step()
        elif which == "best":
            step = ckpt.best_step() or ckpt.latest_step()
        else:
            step = int(which)
            if step not in steps:
                raise FileNotFoundError(f"{workdir}: no checkpoint at step {step} "
                                        f"(have {sorted(steps)})")
        variables = ckpt.restore_variables(step)
    finally:
        ckpt.close()
    return model_cfg, jax.tree_util.tree_map(np.asarray, variables)
