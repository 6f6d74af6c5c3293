"""A run's stored config: comparison on resume, and the append-only config history.

Files in the workdir (written by process 0):
  config.json           the config the run was started with (written once)
  config_history.jsonl  one JSON record per start: {"time", "step", "changes",
                        "config"}; the last record is the config in effect
  model_config.json     the model config (written once; rewritten only by an
                        explicitly allowed architecture change)

On resume (`check_resume`, called before the run writes anything) the new
config is compared with the stored one and every difference is printed.
Changes to the architecture (`model.*`) or the batch protocol (PROTECTED) are
refused unless `allow_config_change=True`; a change that alters the shapes of
the parameters is refused even then (a checkpoint cannot be resumed into
another parameter layout: start a new workdir with `init_from`). Execution
options (`runtime.*`) and everything else (learning rate, logging, evaluation,
checkpoint period, ...) may change freely.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Any, Optional

import jax
import ml_collections

from msit_jax.io import checkpoint as model_checkpoint
from msit_jax.models.config import LEGACY_RUNTIME_FIELDS
from msit_jax.errors import ConfigError, one_line
from msit_jax.training.config import flatten

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
MODEL_CONFIG_FILE = model_checkpoint.CONFIG_FILE

# The batch protocol: what each batch is made of (batches are a function of
# (seed, step)); changing it mid-run silently changes the experiment.
PROTECTED = ("seed", "batch_size", "data.inp_size", "data.sample_q", "data.scale_min",
             "data.scale_max", "data.augment", "data.repeat", "data.train.kind",
             "data.train.split", "data.train.name", "data.train.first_k",
             "data.train.meta_info", "data.train.image_key")
# Fields that are not part of the experiment at all.
IGNORED = ("allow_config_change",)


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON data (tuples as lists), as config.json stores it."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e}); fix or remove it to resume") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None


def stored_config(workdir: str) -> Optional[tuple[dict, str]]:
    """(config dict in effect, the file it came from): the last record of
    config_history.jsonl, else config.json; None when neither exists."""
    hist = os.path.join(workdir, HISTORY_FILE)
    if os.path.isfile(hist):
        last = None
        with open(hist) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    last = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{hist}: line {n} is not valid JSON ({e}); fix or remove "
                                      "it to resume") from None
        if last is not None:
            if not isinstance(last.get("config"), dict):
                raise ConfigError(f"{hist}: its last record has no config")
            return last["config"], hist
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.isfile(path):
        data = _read_json(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return data, path
    return None


def is_compared(field: str) -> bool:
    """Whether a field's change matters on resume (execution options and IGNORED do not)."""
    legacy = {f"model.{k}" for k in LEGACY_RUNTIME_FIELDS}  # execution options, moved out
    return field not in IGNORED and field not in legacy and not field.startswith("runtime.")


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(field, stored value, new value) for every differing field ('<absent>' if missing)."""
    a, b = flatten(old), flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb:
            out.append((k, va, vb))
    return out


def is_protected(field: str) -> bool:
    return field.startswith("model.") or field in PROTECTED


def _model_cfg(data: dict) -> ml_collections.ConfigDict:
    return model_checkpoint.config_from_json(json.dumps(data))


def _shape_change(old_model: dict, new_model: ml_collections.ConfigDict) -> Optional[str]:
    """The first parameter whose shape differs between two model configs, or None."""
    from msit_jax.models.model import variable_shapes

    try:
        a = flatten(variable_shapes(_model_cfg(old_model)))
    except Exception as e:  # noqa: BLE001 - an old config we cannot rebuild
        return f"the stored model config cannot be built ({one_line(str(e), 200)})"
    b = flatten(variable_shapes(new_model))
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k}: {a.get(k)} -> {b.get(k)}"
    return None


def check_resume(workdir: str, config: ml_collections.ConfigDict, resuming: bool
                 ) -> list[tuple[str, Any, Any]]:
    """Compare `config` with the workdir's stored config; print the differences.

    Returns the differences (runtime options included, for the history).
    Raises ConfigError, before anything is written, for refused changes.
    """
    stored = stored_config(workdir)
    if stored is None:
        return []
    old, source = stored
    new = config_to_dict(config)
    diffs = differences(old, new)
    if not diffs:
        return []
    real = [d for d in diffs if is_compared(d[0])]
    if not resuming:
        if real:
            log.info("%s holds the config of a run with no checkpoint; starting afresh with "
                     "%d changed field(s)", source, len(real))
        return diffs
    for k, a, b in diffs:
        kind = ("protected" if is_compared(k) and is_protected(k)
                else "allowed" if is_compared(k) else "execution option")
        log.warning("config on resume: %s: %s -> %s (%s)", k, json.dumps(a), json.dumps(b), kind)
    protected = [d for d in real if is_protected(d[0])]
    if not protected:
        return diffs
    k, a, b = protected[0]
    what = "the architecture" if k.startswith("model.") else "the batch protocol"
    more = f" (and {len(protected) - 1} more protected field(s))" if len(protected) > 1 else ""
    if not config.get("allow_config_change", False):
        raise ConfigError(
            f"config change on resume refused: {k}: {json.dumps(a)} -> {json.dumps(b)}{more} "
            f"changes {what} of the run in {workdir} (stored in {source}); nothing was "
            "written. Use the stored value, a new workdir (with init_from), or "
            "--config.allow_config_change=True")
    model_changes = [d for d in protected if d[0].startswith("model.")]
    if model_changes:
        shape = _shape_change(old.get("model", {}), config.model)
        if shape is not None:
            raise ConfigError(
                f"config change on resume refused: {model_changes[0][0]}: "
                f"{json.dumps(model_changes[0][1])} -> {json.dumps(model_changes[0][2])} "
                f"changes the parameter shapes ({shape}); a checkpoint cannot be resumed into "
                "another parameter layout even with allow_config_change: start a new workdir "
                "with init_from")
    log.warning("allow_config_change=True: resuming with %d protected change(s)",
                len(protected))
    return diffs


def record(workdir: str, config: ml_collections.ConfigDict, step: int,
           changes: list[tuple[str, Any, Any]], fresh: bool) -> None:
    """Append this start to config_history.jsonl; write config.json and model_config.json
    when absent or on a fresh start (no checkpoint behind them), and model_config.json
    after an allowed architecture change. Process 0 only; files are replaced atomically."""
    if jax.process_index() != 0:
        return
    data = config_to_dict(config)
    entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "step": int(step),
             "changes": [{"field": k, "old": a, "new": b} for k, a, b in changes],
             "config": data}
    with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
    cfg_path = os.path.join(workdir, CONFIG_FILE)
    if fresh or not os.path.exists(cfg_path):
        _write_atomic(cfg_path, config.to_json_best_effort(indent=2, sort_keys=True))
    model_path = os.path.join(workdir, MODEL_CONFIG_FILE)
    model_changed = any(k.startswith("model.") and is_compared(k) for k, _, _ in changes)
    if fresh or not os.path.exists(model_path) or model_changed:
        _write_atomic(model_path, model_checkpoint.config_to_json(config.model))


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
