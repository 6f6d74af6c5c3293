"""Training checkpoints: Orbax CheckpointManager over (train state, data iterator state),
with integrity checks.

Layout of a training workdir:
  WORKDIR/config.json          the run's first config; config_history.jsonl: every
                               start's config and its changes (see `run_config`)
  WORKDIR/model_config.json    the model config (to rebuild the model)
  WORKDIR/checkpoints/<step>/  state/ (Orbax tree of TrainState), data/ (grain
                               iterator state, one JSON per process), integrity/
                               (checksums, see below), files.sha256.json
  WORKDIR/rejected_checkpoints/<step>/   checkpoints that failed verification on
                               resume, moved out of the way (never deleted)
  WORKDIR/metrics.jsonl, WORKDIR/tensorboard/   logs (see `metrics`)

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
import hashlib
import json
import logging
import math
import os
from typing import Any, Optional, Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from msit_jax.io import checkpoint as model_checkpoint
from msit_jax.io.checkpoint import quiet_orbax, short_error as _short
from msit_jax.errors import CheckpointError, NonFiniteError, OutputError, one_line

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
REJECTED_DIR = "rejected_checkpoints"
MODEL_CONFIG_FILE = model_checkpoint.CONFIG_FILE
BEST_METRIC = "val_psnr"
STATE_ITEM, DATA_ITEM, INTEGRITY_ITEM = "state", "data", "integrity"
FILES_MANIFEST = "files.sha256.json"
INTEGRITY_FORMAT = 1
VARIABLE_COLLECTIONS = ("params", "frozen", "batch_stats")


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


def saved_steps(workdir: str) -> list[int]:
    """Finished checkpoint steps in WORKDIR/checkpoints, read from the directory names
    (no Orbax manager, nothing created)."""
    root = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root)
                  if n.isdigit() and os.path.isdir(os.path.join(root, n)))


# ---------------------------------------------------------------------------- checksums

def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _host(x: Any) -> np.ndarray:
    """A (replicated, possibly multi-host) array on this host as numpy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def leaf_records(tree: Any) -> dict[str, dict[str, Any]]:
    """{'params/encoder/.../kernel': {sha256, shape, dtype, nonfinite}} for every leaf.

    Paths join the keys with '/' whatever the container (dict, dataclass,
    namedtuple), so a tree restored without a target names its leaves alike.
    """
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        a = _host(x)
        flat = np.ascontiguousarray(a).reshape(-1)
        rec = {"sha256": hashlib.sha256(flat.view(np.uint8)).hexdigest(),
               "shape": list(a.shape), "dtype": str(a.dtype)}
        if np.issubdtype(a.dtype, np.inexact):
            rec["nonfinite"] = int(flat.size - np.count_nonzero(np.isfinite(flat)))
        out["/".join(_key_name(p) for p in path)] = rec
    return out


def data_digest(data_state: Optional[dict]) -> Optional[str]:
    if data_state is None:
        return None
    return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


def nonfinite_leaves(records: dict[str, dict]) -> list[tuple[str, int]]:
    return [(k, r["nonfinite"]) for k, r in records.items() if r.get("nonfinite")]


def compare_records(recorded: dict[str, dict], got: dict[str, dict],
                    prefixes: Optional[Sequence[str]] = None) -> Optional[str]:
    """The first difference between recorded and restored leaves (None: they match).

    prefixes: compare only leaves under these paths (a partial restore)."""
    keys = [k for k in recorded if prefixes is None or k.split("/", 1)[0] in prefixes]
    for k in keys:
        want, have = recorded[k], got.get(k)
        if have is None:
            return f"leaf {k} is missing"
        if have["shape"] != want["shape"] or have["dtype"] != want["dtype"]:
            return (f"leaf {k} is {have['dtype']}{have['shape']}, recorded "
                    f"{want['dtype']}{want['shape']}")
        if have["sha256"] != want["sha256"]:
            return f"leaf {k} differs from the checksum recorded at save"
    return None


def file_digests(step_dir: str) -> dict[str, str]:
    """SHA-256 of every file of a step's items (paths relative to the step directory)."""
    out = {}
    for item in sorted(os.listdir(step_dir)):
        root = os.path.join(step_dir, item)
        if not os.path.isdir(root):
            continue
        for dirpath, _, files in os.walk(root):
            for f in sorted(files):
                path = os.path.join(dirpath, f)
                h = hashlib.sha256()
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        h.update(block)
                out[os.path.relpath(path, step_dir)] = h.hexdigest()
    return out


def check_file_digests(step_dir: str) -> Optional[str]:
    """The first file that is missing or differs from `files.sha256.json` (None: all match,
    or no manifest). The message names the file."""
    manifest = os.path.join(step_dir, FILES_MANIFEST)
    if not os.path.isfile(manifest):
        return None
    try:
        with open(manifest) as f:
            want = json.load(f)
    except (OSError, ValueError) as e:
        return f"{manifest} is unreadable ({one_line(str(e), 200)})"
    for rel, digest in sorted(want.items()):
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != digest:
            return f"{path} differs from its recorded checksum"
    return None


def _any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (all processes must agree on a fallback)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


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


class Checkpointer:
    """Save / restore train state + data iterator state in WORKDIR/checkpoints, verified.

    last_verified: the newest step read back (or restored) and found to match its
    record; retention never deletes it.
    """

    def __init__(self, workdir: str, keep: int = 3, keep_best: bool = True,
                 async_save: bool = True, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        self.last_verified: Optional[int] = None
        self._pending: Optional[_Pending] = None
        policies = [pp.LatestN(keep), _PreserveVerified(self)]
        if keep_best:
            policies.append(pp.BestN(get_metric_fn=_best_fn, n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            best_fn=_best_fn, best_mode="max",
            enable_async_checkpointing=async_save, read_only=read_only,
            create=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------ queries

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        """The step with the highest validation PSNR, or None when none was validated."""
        try:
            return self.manager.best_step()
        except Exception as e:  # noqa: BLE001 - unreadable metrics: no best step
            log.warning("could not read the checkpoints' validation metrics (%s)", _short(e))
            return None

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

    def describe_step(self, step: Optional[int]) -> str:
        return "none" if step is None else f"step {step} ({self.step_dir(step)})"

    def _restore(self, step: int, abstract_state: Any, with_data: bool,
                 record: Optional[dict] = None,
                 prefixes: Optional[Sequence[str]] = None) -> tuple[Any, Optional[dict]]:
        step_dir = self.step_dir(step)

        def fail(msg: str) -> CheckpointError:
            return CheckpointError(f"checkpoint step {step}: {msg}", step=step, path=step_dir)

        problem = None
        if not os.path.isdir(step_dir):
            problem = f"{step_dir} is missing"
        else:
            need = [STATE_ITEM] + ([DATA_ITEM] if with_data else [])
            missing = [n for n in need if not os.path.isdir(os.path.join(step_dir, n))]
            problem = (f"{os.path.join(step_dir, missing[0])}/ is missing" if missing
                       else check_file_digests(step_dir))
        if _any_process(problem is not None):
            raise fail(problem or "another process found it corrupt")
        has_record = record is not None or os.path.isdir(os.path.join(step_dir, INTEGRITY_ITEM))
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if record is None and has_record:
            items[INTEGRITY_ITEM] = ocp.args.JsonRestore()
        snap = IteratorSnapshot()
        if with_data:
            items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(snap)
        error = None
        out: dict = {}
        try:
            with quiet_orbax():
                out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - any failure to read is a bad checkpoint
            error = e
        if _any_process(error is not None):
            msg = (f"cannot be restored from {step_dir} ({_short(error)})" if error is not None
                   else "another process could not restore it")
            raise fail(msg) from error
        state = out[STATE_ITEM]
        record = record if record is not None else out.get(INTEGRITY_ITEM)
        got = leaf_records(state)
        if record is not None:
            if not isinstance(record, dict) or record.get("format") != INTEGRITY_FORMAT:
                problem = f"{os.path.join(step_dir, INTEGRITY_ITEM)} is not a known record"
            else:
                problem = compare_records(record["leaves"], got, prefixes)
                if (problem is None and with_data and record.get("data_sha256")
                        and jax.process_index() == 0  # the record holds process 0's
                        and data_digest(snap.state) != record["data_sha256"]):
                    problem = (f"{os.path.join(step_dir, DATA_ITEM)} (data iterator state) "
                               "differs from the checksum recorded at save")
                if problem is not None:
                    problem += f" (in {os.path.join(step_dir, STATE_ITEM)})" \
                        if problem.startswith("leaf") else ""
        if problem is None:
            bad = [(k, n) for k, n in nonfinite_leaves(got)
                   if prefixes is None or k.split("/", 1)[0] in prefixes]
            if bad:
                problem = (f"{len(bad)} of {len(got)} state leaves hold non-finite values "
                           f"(first: {bad[0][0]}) in {os.path.join(step_dir, STATE_ITEM)}")
        if problem is None and prefixes is None and "step" in got:
            saved = state.step if hasattr(state, "step") else state["step"]
            if int(_host(saved)) != step:
                problem = f"its train state holds step {int(_host(saved))}"
        if _any_process(problem is not None):
            raise fail(problem or "another process found it corrupt")
        if record is None:
            log.warning("checkpoint step %d has no checksums (written before msit-jax recorded "
                        "them): restored unverified", step)
        return state, (snap.state if with_data else None)

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
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("msit_reject_checkpoints")
        self.manager.reload()
        return moved

    def restore_variables(self, step: int) -> dict:
        """The model variables of a checkpoint as saved (no optimizer state needed), verified."""
        st, _ = self._restore(step, None, with_data=False, prefixes=VARIABLE_COLLECTIONS)
        return {k: st[k] for k in VARIABLE_COLLECTIONS if st.get(k)}

    # ------------------------------------------------------------------ lifecycle

    def wait(self) -> None:
        """Wait for the last save and verify it (see `verify_pending`)."""
        self.verify_pending()

    def close(self) -> None:
        self.manager.close()


def load_workdir_model(workdir: str, which: str = "best"):
    """(model_cfg, numpy variables) of a training workdir's checkpoint.

    which: 'best' (highest validation PSNR; the latest when nothing was
    validated), 'latest', or a step number. A 'best' or 'latest' step that
    fails verification is reported in one line and the newest good step is
    loaded instead; an explicit step does not fall back.
    """
    from msit_jax.io.checkpoint import read_model_config

    if not is_training_workdir(workdir):
        raise FileNotFoundError(f"{workdir} is not a msit-jax training workdir (expected "
                                f"{MODEL_CONFIG_FILE} and {CHECKPOINT_DIR}/ inside)")
    model_cfg = read_model_config(os.path.join(workdir, MODEL_CONFIG_FILE))
    ckpt = Checkpointer(workdir, read_only=True, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"{workdir}: no finished checkpoint in {CHECKPOINT_DIR}/",
                                  path=ckpt.directory)
        if which in ("best", "latest"):
            first = ckpt.best_step() if which == "best" else None
            order = ([first] if first is not None else []) + \
                [s for s in reversed(steps) if s != first]
        else:
            try:
                step = int(which)
            except ValueError:
                raise ValueError(f"which={which!r}: expected 'best', 'latest' or a step "
                                 "number") from None
            if step not in steps:
                raise CheckpointError(f"{workdir}: no checkpoint at step {step} "
                                      f"(have {steps})", path=ckpt.directory)
            order = [step]
        failed = []
        for step in order:
            try:
                variables = ckpt.restore_variables(step)
            except CheckpointError as e:
                failed.append(e)
                if len(order) > 1:
                    log.warning("%s; trying the previous checkpoint", e)
                continue
            if failed:
                log.warning("%s: loaded checkpoint step %d instead (the newest good one)",
                            workdir, step)
            break
        else:
            if len(failed) == 1:
                raise failed[0]
            raise CheckpointError(f"{workdir}: no usable checkpoint: "
                                  + "; ".join(str(e) for e in failed), path=ckpt.directory)
    finally:
        ckpt.close()
    return model_cfg, jax.tree_util.tree_map(np.asarray, variables)
