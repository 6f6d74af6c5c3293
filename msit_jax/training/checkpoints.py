"""Training checkpoints: Orbax CheckpointManager over (train state, data iterator state),
with integrity checks.

The workdir layout, the integrity records and verified restores are
`msit_jax.io.workdir` (the read side, which inference and export use too);
this module adds saving, retention and resuming.

Integrity. Every save records, inside the checkpoint (so it is committed
atomically with it), the SHA-256 of every state leaf's bytes, its shape and
dtype, and the SHA-256 of the data iterator state; a state with a non-finite
value is never saved. Once the asynchronous write has finished, the step is
read back and compared with that record (at the next save, or when the run
waits for its saves) and, if it matches, the SHA-256 of every file is written
to `files.sha256.json`: the step is then *verified good*. Restoring a step
checks the file digests (naming a changed or missing file), restores, and
compares the values with the record (naming the leaf); a step that fails is
reported in one line and the caller falls back to the next older step
(`restore_latest`, `load_workdir_model`). Checkpoints written before the
records existed restore unverified (after a finiteness check).

Retention: the last `keep` checkpoints, the best one by validation PSNR, and
always the last verified-good one (a newer step that could not be verified
never pushes it out). Saves are asynchronous; a crash mid-save leaves a
temporary directory Orbax ignores, never a half checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Mapping, Optional, Sequence

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from msit_jax.errors import CheckpointError, NonFiniteError, OutputError
from msit_jax.io.model_dir import quiet_orbax, short_error as _short
from msit_jax.io.workdir import (
    CHECKPOINT_DIR, DATA_ITEM, FILES_MANIFEST, INTEGRITY_FORMAT, INTEGRITY_ITEM,
    CheckpointReader, best_metric, data_digest, file_digests, is_training_workdir,
    leaf_records, load_workdir_model, nonfinite_leaves, saved_steps)

# The workdir's read side lives in msit_jax.io.workdir; training code names it here too.
__all__ = ["CHECKPOINT_DIR", "FILES_MANIFEST", "REJECTED_DIR", "Checkpointer",
           "IteratorSnapshot", "is_training_workdir", "load_workdir_model", "saved_steps"]

log = logging.getLogger(__name__)

REJECTED_DIR = "rejected_checkpoints"


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


@dataclasses.dataclass
class _Pending:
    """A save whose read-back verification is still to do."""

    step: int
    abstract: Any
    record: dict
    with_data: bool


class _PreserveVerified(pp.PreservationPolicy):
    """Preserves the last verified-good step (a live view of the Checkpointer's)."""

    def __init__(self, owner: "Checkpointer"):
        self.owner = owner

    def should_preserve(self, checkpoints, *, context) -> Sequence[bool]:
        keep = self.owner.last_verified
        return [c.step == keep for c in checkpoints]


class Checkpointer(CheckpointReader):
    """Save / restore train state + data iterator state in WORKDIR/checkpoints, verified.

    last_verified: the newest step read back (or restored) and found to match its
    record; retention never deletes it.
    """

    def __init__(self, workdir: str, keep: int = 3, keep_best: bool = True,
                 async_save: bool = True, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.last_verified: Optional[int] = None
        self._pending: Optional[_Pending] = None
        policies = [pp.LatestN(keep), _PreserveVerified(self)]
        if keep_best:
            policies.append(pp.BestN(get_metric_fn=best_metric, n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            best_fn=best_metric, best_mode="max",
            enable_async_checkpointing=async_save, read_only=read_only,
            create=not read_only)
        super().__init__(workdir, options)

    def last_good_step(self) -> Optional[int]:
        """The newest step known good: the last verified one, or one saved since whose
        read-back is pending (its values were checked finite and recorded at save)."""
        return self._pending.step if self._pending is not None else self.last_verified

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: Any, data_state: Optional[dict],
             metrics: Optional[dict] = None) -> None:
        """Save asynchronously with an integrity record; NonFiniteError (nothing saved)
        when a state value is NaN or infinite."""
        self.verify_pending()
        records = leaf_records(state)
        bad = nonfinite_leaves(records)
        if bad:
            k, n = bad[0]
            raise NonFiniteError(
                f"refusing to save step {step}: {len(bad)} state leaves hold non-finite values "
                f"(first: {k}, {n} values); last good checkpoint: "
                f"{self.describe_step(self.last_good_step())}")
        record = {"format": INTEGRITY_FORMAT, "step": int(step), "leaves": records,
                  "data_sha256": data_digest(data_state) if jax.process_index() == 0 else None}
        items = dict(state=ocp.args.StandardSave(state), integrity=ocp.args.JsonSave(record))
        if data_state is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(IteratorSnapshot(data_state))
        if metrics is not None and not all(math.isfinite(float(v)) for v in metrics.values()):
            metrics = None  # a NaN PSNR must not rank checkpoints
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            state)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        except OSError as e:
            raise OutputError(f"could not save checkpoint step {step} in {self.directory}: "
                              f"{_short(e)}") from e
        self._pending = _Pending(int(step), abstract, record, data_state is not None)

    def verify_pending(self) -> None:
        """Wait for the last save, read it back and compare it with its record; on a
        match write its file digests and make it the last verified step."""
        pending, self._pending = self._pending, None
        try:
            with quiet_orbax():
                self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the async write failed (disk full, ...)
            where = pending.step if pending else "?"
            raise OutputError(f"saving checkpoint step {where} in {self.directory} failed: "
                              f"{_short(e)}") from e
        if pending is None:
            return
        try:
            self._restore(pending.step, pending.abstract, pending.with_data,
                          record=pending.record)
        except CheckpointError as e:
            log.error("%s (read back after saving); the last verified checkpoint, step %s, "
                      "is kept", e, self.last_verified)
            return
        if jax.process_index() == 0:
            step_dir = self.step_dir(pending.step)
            tmp = os.path.join(step_dir, FILES_MANIFEST + ".tmp")
            with open(tmp, "w") as f:
                json.dump(file_digests(step_dir), f, indent=0, sort_keys=True)
            os.replace(tmp, os.path.join(step_dir, FILES_MANIFEST))
        self.last_verified = pending.step

    # ------------------------------------------------------------------ restore

    def _restore(self, step: int, abstract_state: Any, with_data: bool,
                 record: Optional[dict] = None) -> tuple[Any, Optional[dict]]:
        """(state, data iterator state or None), verified (`CheckpointReader.restore_step`),
        the data iterator state against its recorded checksum too."""
        if not with_data:
            state, _ = self.restore_step(step, abstract_state, record)
            return state, None
        snap = IteratorSnapshot()

        def check_data(rec: Optional[dict], _: Mapping[str, Any]) -> Optional[str]:
            if (rec and rec.get("data_sha256")
                    and jax.process_index() == 0  # the record holds process 0's
                    and data_digest(snap.state) != rec["data_sha256"]):
                return (f"{os.path.join(self.step_dir(step), DATA_ITEM)} (data iterator "
                        "state) differs from the checksum recorded at save")
            return None

        state, _ = self.restore_step(step, abstract_state, record,
                                     items={DATA_ITEM: grain.checkpoint.CheckpointRestore(snap)},
                                     check=check_data)
        return state, snap.state

    def restore(self, step: int, abstract_state: Any, with_data: bool = True
                ) -> tuple[Any, Optional[dict]]:
        """(state placed as abstract_state's shardings, data iterator state or None),
        verified; CheckpointError naming the step and the file or leaf when it fails."""
        state, data = self._restore(step, abstract_state, with_data)
        if os.path.isdir(os.path.join(self.step_dir(step), INTEGRITY_ITEM)):
            self.last_verified = step  # what training continues from
        return state, data

    def restore_latest(self, abstract_state: Any, with_data: bool = True,
                       reject_bad: bool = True
                       ) -> Optional[tuple[int, Any, Optional[dict]]]:
        """(step, state, data state) of the newest step that restores and verifies, or
        None when there is no checkpoint. Each step that fails is reported in one line;
        with reject_bad, steps newer than the one restored are moved to
        WORKDIR/rejected_checkpoints (kept, out of the way of new saves).
        CheckpointError when checkpoints exist but none is usable."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        failed: list[CheckpointError] = []
        for step in steps:
            try:
                state, data = self.restore(step, abstract_state, with_data)
            except CheckpointError as e:
                log.warning("%s; trying the previous checkpoint", e)
                failed.append(e)
                continue
            if failed:
                log.warning("resuming from checkpoint step %d, the newest good one "
                            "(%d newer step(s) failed verification)", step, len(failed))
                if reject_bad:
                    self.reject([e.step for e in failed])
            return step, state, data
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: "
            + "; ".join(str(e) for e in failed)
            + f". Restore the files, or move {self.directory} aside to start over",
            step=failed[0].step, path=self.directory)

    def reject(self, steps: Sequence[int]) -> list[str]:
        """Move steps to WORKDIR/rejected_checkpoints/<step>[.k] (kept for inspection)."""
        moved = []
        if jax.process_index() == 0:
            root = os.path.join(self.workdir, REJECTED_DIR)
            os.makedirs(root, exist_ok=True)
            for step in steps:
                dst, k = os.path.join(root, str(step)), 0
                while os.path.exists(dst):
                    k += 1
                    dst = os.path.join(root, f"{step}.{k}")
                os.rename(self.step_dir(step), dst)
                log.warning("moved checkpoint step %d, which failed verification, to %s",
                            step, dst)
                moved.append(dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("msit_reject_checkpoints")
        self.manager.reload()
        return moved

    # ------------------------------------------------------------------ lifecycle

    def wait(self) -> None:
        """Wait for the last save and verify it (see `verify_pending`)."""
        self.verify_pending()
