"""Reading a training workdir: its layout, integrity records and verified restores.

    model_cfg, variables = load_workdir_model("runs/stage1")   # best, else latest step

Layout of a training workdir:
  WORKDIR/config.json          the run's first config; config_history.jsonl: every
                               start's config and its changes (see `training.run_config`)
  WORKDIR/model_config.json    the model config (to rebuild the model)
  WORKDIR/checkpoints/<step>/  state/ (Orbax tree of TrainState), data/ (grain
                               iterator state, one JSON per process), integrity/
                               (checksums, see below), files.sha256.json
  WORKDIR/rejected_checkpoints/<step>/   checkpoints that failed verification on
                               resume, moved out of the way (never deleted)
  WORKDIR/metrics.jsonl, WORKDIR/tensorboard/   logs (see `training.metrics`)

Integrity. Every save records, inside the checkpoint, the SHA-256 of every
state leaf's bytes, its shape and dtype (`leaf_records`), and the SHA-256 of
the data iterator state; once a save has been read back and matched, the
SHA-256 of every file goes to `files.sha256.json`. Restoring a step checks the
file digests (naming a changed or missing file), restores, and compares the
values with the record (naming the leaf); see `CheckpointReader.restore_step`.

This module is the read side, enough to load a workdir's model for inference,
export or stage-2 initialisation without importing training code;
`msit_jax.training.checkpoints.Checkpointer` extends `CheckpointReader` with
saving, retention and resuming (train state and data iterator).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from msit_jax import console
from msit_jax.errors import CheckpointError, one_line
from msit_jax.io.model_dir import (CONFIG_FILE, quiet_orbax, read_model_config,
                                   shape_differences, short_error)
from msit_jax.models.model import variable_shapes

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MODEL_CONFIG_FILE = CONFIG_FILE
BEST_METRIC = "val_psnr"
STATE_ITEM, DATA_ITEM, INTEGRITY_ITEM = "state", "data", "integrity"
FILES_MANIFEST = "files.sha256.json"
INTEGRITY_FORMAT = 1
VARIABLE_COLLECTIONS = ("params", "frozen", "batch_stats")


def best_metric(metrics: Mapping[str, Any]) -> float:
    """The value checkpoints are ranked by (higher is better): validation PSNR."""
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


def set_aside(path: str, why: str) -> str:
    """Rename an unreadable auxiliary file (metrics.jsonl, config_history.jsonl,
    config.json, ...) to `<name>.corrupt-<UTC time>` (bytes kept, for inspection) and
    log one warning naming both; the new path. Training never stops on such a file:
    what it holds is either rebuilt or not needed to resume (the checkpoints are)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dst, k = f"{path}.corrupt-{stamp}", 0
    while os.path.exists(dst):
        k += 1
        dst = f"{path}.corrupt-{stamp}.{k}"
    os.rename(path, dst)
    log.warning("%s is unreadable (%s): set aside as %s, bytes kept; training goes on",
                path, why, os.path.basename(dst))
    return dst


def read_text_lines(path: str) -> tuple[list[str], list[int]]:
    """(the file's lines decoded as UTF-8, 1-based numbers of the lines that are not
    UTF-8, left out); never raises UnicodeDecodeError."""
    with open(path, "rb") as f:
        raw = f.read()
    lines, bad = [], []
    for n, b in enumerate(raw.split(b"\n"), 1):
        try:
            lines.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append(n)
    return lines, bad


# ---------------------------------------------------------------------------- checksums

def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def host_array(x: Any) -> np.ndarray:
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
        a = host_array(x)
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


def file_sha256(path: str) -> str:
    """sha256 hex digest of a file, read in 4 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
                out[os.path.relpath(path, step_dir)] = file_sha256(path)
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
        if file_sha256(path) != digest:
            return f"{path} differs from its recorded checksum"
    return None


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (all processes must agree on a fallback)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


# ---------------------------------------------------------------------------- restores

# Extra checks of a restore: (integrity record or None, restored items) -> a problem
# (one line) or None.
ItemCheck = Callable[[Optional[dict], Mapping[str, Any]], Optional[str]]


class CheckpointReader:
    """Verified restores from WORKDIR/checkpoints (read only unless `options` say otherwise).

    options: the Orbax CheckpointManagerOptions (default: read only, checkpoints
    ranked by validation PSNR for `best_step`).
    """

    def __init__(self, workdir: str, options: Optional[ocp.CheckpointManagerOptions] = None):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        # Read-only options and their manager log an absl warning each (read_only sets
        # save_interval_steps=0; "Given directory is read only"): what was asked for.
        read_only = options is None or options.read_only
        with (console.quiet_library_logs() if read_only else contextlib.nullcontext()):
            if options is None:
                options = ocp.CheckpointManagerOptions(best_fn=best_metric, best_mode="max",
                                                       enable_async_checkpointing=False,
                                                       read_only=True, create=False)
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
            log.warning("could not read the checkpoints' validation metrics (%s)",
                        short_error(e))
            return None

    def describe_step(self, step: Optional[int]) -> str:
        return "none" if step is None else f"step {step} ({self.step_dir(step)})"

    # ------------------------------------------------------------------ restore

    def restore_step(self, step: int, abstract_state: Any, record: Optional[dict] = None,
                     prefixes: Optional[Sequence[str]] = None,
                     items: Optional[Mapping[str, Any]] = None,
                     check: Optional[ItemCheck] = None) -> tuple[Any, dict]:
        """(state, all restored items) of one step, verified; CheckpointError naming the
        step and the file or leaf when it fails (the same on every process).

        abstract_state: the target tree (None: as saved). record: the integrity record
        to compare with (default: the one saved in the step). prefixes: verify only
        these top-level keys (a partial restore). items: more Orbax items to restore
        with the state ({name: restore args}); each must exist. check: a further check
        of the restored items against the record.
        """
        step_dir = self.step_dir(step)
        items = dict(items or {})

        def fail(msg: str) -> CheckpointError:
            return CheckpointError(f"checkpoint step {step}: {msg}", step=step, path=step_dir)

        problem = None
        if not os.path.isdir(step_dir):
            problem = f"{step_dir} is missing"
        else:
            need = [STATE_ITEM] + list(items)
            missing = [n for n in need if not os.path.isdir(os.path.join(step_dir, n))]
            problem = (f"{os.path.join(step_dir, missing[0])}/ is missing" if missing
                       else check_file_digests(step_dir))
        if any_process(problem is not None):
            raise fail(problem or "another process found it corrupt")
        has_record = record is not None or os.path.isdir(os.path.join(step_dir, INTEGRITY_ITEM))
        items[STATE_ITEM] = ocp.args.StandardRestore(abstract_state)
        if record is None and has_record:
            items[INTEGRITY_ITEM] = ocp.args.JsonRestore()
        error = None
        out: Mapping[str, Any] = {}
        try:
            with quiet_orbax():
                out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - any failure to read is a bad checkpoint
            error = e
        if any_process(error is not None):
            msg = (f"cannot be restored from {step_dir} ({short_error(error)})"
                   if error is not None else "another process could not restore it")
            raise fail(msg) from error
        state = out[STATE_ITEM]
        record = record if record is not None else out.get(INTEGRITY_ITEM)
        got = leaf_records(state)
        if record is not None:
            if not isinstance(record, dict) or record.get("format") != INTEGRITY_FORMAT:
                problem = f"{os.path.join(step_dir, INTEGRITY_ITEM)} is not a known record"
            else:
                problem = compare_records(record["leaves"], got, prefixes)
                if problem is None and check is not None:
                    problem = check(record, out)
                if problem is not None and problem.startswith("leaf"):
                    problem += f" (in {os.path.join(step_dir, STATE_ITEM)})"
        if problem is None:
            bad = [(k, n) for k, n in nonfinite_leaves(got)
                   if prefixes is None or k.split("/", 1)[0] in prefixes]
            if bad:
                problem = (f"{len(bad)} of {len(got)} state leaves hold non-finite values "
                           f"(first: {bad[0][0]}) in {os.path.join(step_dir, STATE_ITEM)}")
        if problem is None and prefixes is None and "step" in got:
            saved = state.step if hasattr(state, "step") else state["step"]
            if int(host_array(saved)) != step:
                problem = f"its train state holds step {int(host_array(saved))}"
        if any_process(problem is not None):
            raise fail(problem or "another process found it corrupt")
        if record is None:
            log.warning("checkpoint step %d has no checksums (written before msit-jax recorded "
                        "them): restored unverified", step)
        return state, dict(out)

    def restore_variables(self, step: int) -> dict:
        """The model variables of a checkpoint as saved (no optimizer state needed), verified."""
        st, _ = self.restore_step(step, None, prefixes=VARIABLE_COLLECTIONS)
        return {k: st[k] for k in VARIABLE_COLLECTIONS if st.get(k)}

    def close(self) -> None:
        self.manager.close()


def load_workdir_model(workdir: str, which: str = "best"
                       ) -> tuple[ml_collections.ConfigDict, dict]:
    """(model_cfg, numpy variables) of a training workdir's checkpoint.

    which: 'best' (highest validation PSNR; the latest when nothing was
    validated), 'latest', or a step number. A 'best' or 'latest' step that
    fails verification is reported in one line and the newest good step is
    loaded instead; an explicit step does not fall back.
    """
    if not is_training_workdir(workdir):
        raise FileNotFoundError(f"{workdir} is not a msit-jax training workdir (expected "
                                f"{MODEL_CONFIG_FILE} and {CHECKPOINT_DIR}/ inside)")
    config_path = os.path.join(workdir, MODEL_CONFIG_FILE)
    model_cfg = read_model_config(config_path)
    try:  # shapes only (jax.eval_shape): nothing is allocated from the file
        want = {k: list(v) for k, v in _flat(variable_shapes(model_cfg)).items()}
    except Exception as e:  # noqa: BLE001 - a config that validates but cannot be built
        raise CheckpointError(f"{config_path}: the model cannot be built from it "
                              f"({short_error(e)})", path=config_path) from None
    ckpt = CheckpointReader(workdir)
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
            # A model_config.json that does not describe the checkpoint is the fault of that
            # file (every step would fail alike): said before restoring, no fallback.
            mismatch = _shape_mismatch(want, _recorded_shapes(ckpt.step_dir(step)))
            if mismatch:
                raise _config_mismatch(workdir, config_path, model_cfg, step, mismatch)
            try:
                variables = ckpt.restore_variables(step)
                mismatch = _shape_mismatch(want, {k: list(np.shape(v))
                                                  for k, v in _flat(variables).items()})
                if mismatch:  # a step saved without an integrity record
                    raise _config_mismatch(workdir, config_path, model_cfg, step, mismatch)
            except CheckpointError as e:
                if e.path == config_path:
                    raise
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


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'params/encoder/.../kernel': leaf} of nested mappings (leaf_records' names)."""
    out: dict[str, Any] = {}
    for k, v in (tree.items() if hasattr(tree, "items") else ()):
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _recorded_shapes(step_dir: str) -> Optional[dict[str, list]]:
    """The model variables' shapes in a step's integrity record (None: no readable record;
    the restore then checks the files)."""
    try:
        with open(os.path.join(step_dir, INTEGRITY_ITEM, "metadata"), "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
        leaves = record["leaves"]
        return {k: list(r["shape"]) for k, r in leaves.items()
                if k.split("/", 1)[0] in VARIABLE_COLLECTIONS}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _shape_mismatch(want: dict[str, list], got: Optional[dict[str, list]]) -> Optional[str]:
    """The differences between the config's variable shapes and the checkpoint's, said
    briefly (None: they match, or nothing to compare with)."""
    if got is None:
        return None
    shapes, missing, extra = shape_differences(want, got)
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape mismatch(es), first {k}: {tuple(got[k])} in the "
                     f"checkpoint, {tuple(want[k])} for the file")
    if missing:
        parts.append(f"{len(missing)} variable(s) the checkpoint lacks, first {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} variable(s) the file lacks, first {extra[0]}")
    return "; ".join(parts) or None


def _history_model(workdir: str) -> Optional[dict]:
    """The model config of config_history.jsonl's last readable record (the run's own)."""
    path = os.path.join(workdir, "config_history.jsonl")
    if not os.path.isfile(path):
        return None
    lines, _ = read_text_lines(path)
    for line in reversed(lines):
        try:
            rec = json.loads(line)
            model = rec["config"]["model"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(model, dict):
            return model
    return None


def _config_mismatch(workdir: str, config_path: str, model_cfg: ml_collections.ConfigDict,
                     step: int, mismatch: str) -> CheckpointError:
    run_model = _history_model(workdir)
    fields = ""
    if run_model is not None:
        a, b = _flat(run_model), _flat(json.loads(json.dumps(model_cfg.to_dict())))
        diffs = [f"{k}: {json.dumps(a.get(k))} in config_history.jsonl, "
                 f"{json.dumps(b.get(k))} in the file"
                 for k in sorted(set(a) | set(b)) if k in a and k in b and a[k] != b[k]]
        if diffs:
            fields = f"; fields: {', '.join(diffs[:3])}"
    return CheckpointError(
        f"{config_path} does not match checkpoint step {step} ({mismatch}{fields}): the "
        "file was changed after training; restore it (config_history.jsonl's last record "
        "holds the run's model config)", step=step, path=config_path)
