"""A run's stored config: comparison on resume, and the append-only config history.

Files in the workdir (written by process 0):
  config.json               the config the run was started with (written once; never
                            rewritten by a resume)
  config.resume-<step>.json the config of a resume at <step> that changed anything
  config_history.jsonl      one JSON record per start: {"time", "step", "changes",
                            "config"}; the last record is the config in effect
  model_config.json         the model config (written once; rewritten only by an
                            explicitly allowed architecture change)

The stored config in effect (`stored_config`) is the last readable record of
config_history.jsonl, else the newest config.resume-<step>.json, else
config.json. None of these files can stop a resume (the checkpoints hold what a
resume needs): an unreadable one (not UTF-8, not JSON, a bad line) is passed
over, then set aside as `<name>.corrupt-<time>` (bytes kept, one warning naming
it) and rebuilt from what is readable (`record`); a model_config.json that is
unreadable or disagrees with the run's model config is set aside and rewritten.

On resume (`check_resume`, called before the run writes anything) the new
config is compared with the stored one and every difference is printed, one
line per field (`field: old -> new (kind)`). Changes to the architecture
(`model.*`) or the batch protocol (`is_protected`) are refused unless
`allow_config_change=True`; a change that alters the shapes of the parameters
is refused even then (a checkpoint cannot be resumed into another parameter
layout: start a new workdir with `init_from`). Changes to the learning-rate
schedule (`total_steps`, `lr.*`) are allowed and said to change the schedule
mid-run (`schedule_change`, once the resumed step is known). Execution options
(`runtime.*`, data loading) and everything else (optimizer, logging,
evaluation, checkpoint period, ...) may change freely.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Any, Optional

import jax
import ml_collections

from msit_jax.errors import CheckpointError, ConfigError, one_line
from msit_jax.io import model_dir
from msit_jax.io.workdir import read_text_lines, set_aside
from msit_jax.models.config import LEGACY_RUNTIME_FIELDS
from msit_jax.models.encoders import ENCODERS, unused_sub_configs
from msit_jax.models.model import variable_shapes
from msit_jax.training.config import flatten
from msit_jax.training.schedule import lr_schedule

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RESUME_CONFIG_FILE = "config.resume-{step}.json"
HISTORY_FILE = "config_history.jsonl"
MODEL_CONFIG_FILE = model_dir.CONFIG_FILE

# The batch protocol: what each batch is made of (batches are a function of
# (seed, step)); changing it mid-run silently changes the experiment. Every
# `data.*` field is part of it except DATA_FREE, so a field added later is
# protected until someone decides otherwise.
PROTECTED = ("seed", "batch_size")
# How and where the same images are read: worker and buffer counts, the folder
# or TFDS directory (a dataset may move), the decode cache and the up-front check.
DATA_FREE = ("data.num_workers", "data.num_threads", "data.buffer_size", "data.device_buffer",
             "data.train.path", "data.train.data_dir", "data.train.data_root",
             "data.train.cache_dir",
             "data.train.skip_bad_images")
# The learning-rate schedule (`msit_jax.training.schedule`): allowed, but it changes mid-run.
SCHEDULE = ("total_steps", "lr.")
# Fields that are not part of the experiment at all.
IGNORED = ("allow_config_change",)


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON data (tuples as lists), as config.json stores it."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _read_json_object(path: str) -> tuple[Optional[dict], Optional[str]]:
    """(the JSON object a file holds, None) or (None, what is wrong with it)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        return None, f"cannot be read: {e.strerror}"
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte {e.start})"
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e})"
    if not isinstance(data, dict):
        return None, "not a JSON object"
    return data, None


def _scan_history(path: str) -> tuple[list[dict], list[str]]:
    """(the readable records of config_history.jsonl, its problems: `line N: ...`)."""
    lines, not_utf8 = read_text_lines(path)
    problems = [f"line {n}: not UTF-8" for n in not_utf8]
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"line {n}: not JSON")
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict):
            problems.append(f"line {n}: not a config record")
            continue
        records.append(rec)
    return records, problems


def _resume_configs(workdir: str) -> list[tuple[int, str]]:
    """(step, path) of the config.resume-<step>.json files, oldest first."""
    out = []
    prefix, suffix = RESUME_CONFIG_FILE.split("{step}")
    for name in os.listdir(workdir) if os.path.isdir(workdir) else ():
        mid = name[len(prefix):len(name) - len(suffix)]
        if name.startswith(prefix) and name.endswith(suffix) and mid.isdigit():
            out.append((int(mid), os.path.join(workdir, name)))
    return sorted(out)


def unreadable_files(workdir: str) -> list[tuple[str, str]]:
    """(path, what is wrong) for each stored config file that cannot be read:
    config_history.jsonl (any bad line), config.json, config.resume-<step>.json."""
    out = []
    hist = os.path.join(workdir, HISTORY_FILE)
    if os.path.isfile(hist):
        _, problems = _scan_history(hist)
        if problems:
            out.append((hist, f"{len(problems)} bad line(s), first {problems[0]}"))
    for path in [os.path.join(workdir, CONFIG_FILE)] + [p for _, p in _resume_configs(workdir)]:
        if os.path.isfile(path):
            _, problem = _read_json_object(path)
            if problem:
                out.append((path, problem))
    return out


def stored_config(workdir: str) -> Optional[tuple[dict, str]]:
    """(config dict in effect, the file it came from), or None when nothing is stored.

    The authority, first readable wins: the last readable record of
    config_history.jsonl (the config of the latest start), the newest
    config.resume-<step>.json, then config.json (the first start). Unreadable
    files or lines are passed over here (never an error: the checkpoints, not these
    records, are what a resume needs) and set aside by `record`.
    """
    hist = os.path.join(workdir, HISTORY_FILE)
    if os.path.isfile(hist):
        records, _ = _scan_history(hist)
        if records:
            return records[-1]["config"], hist
    candidates = [p for _, p in reversed(_resume_configs(workdir))]
    for path in candidates + [os.path.join(workdir, CONFIG_FILE)]:
        if os.path.isfile(path):
            data, _ = _read_json_object(path)
            if data is not None:
                return data, path
    return None


def is_compared(field: str) -> bool:
    """Whether a field's change matters on resume (execution options and IGNORED do not)."""
    legacy = {f"model.{k}" for k in LEGACY_RUNTIME_FIELDS}  # execution options, moved out
    return field not in IGNORED and field not in legacy and not field.startswith("runtime.")


def inert_model_field(field: str, *models: dict) -> bool:
    """Whether a `model.*` field sizes an encoder family that none of the model configs
    (dicts) uses: e.g. `model.rcan.n_feats` in an EDSR run, or a sub-dict a newer
    version added (absent from a workdir written before). Such a field shapes nothing."""
    parts = field.split(".")
    if len(parts) < 3 or parts[0] != "model":
        return False
    encoders = [m.get("encoder") for m in models]
    if not encoders or not all(e in ENCODERS for e in encoders):
        return False
    return all(parts[1] in unused_sub_configs(e) for e in encoders)


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
    """The architecture (`model.*`) or the batch protocol (`seed`, `batch_size`, `data.*`
    but DATA_FREE)."""
    return (field.startswith("model.") or field in PROTECTED
            or (field.startswith("data.") and field not in DATA_FREE))


def is_schedule(field: str) -> bool:
    """A field of the learning-rate schedule (`total_steps`, `lr.*`)."""
    return field == SCHEDULE[0] or field.startswith(SCHEDULE[1])


def _model_cfg(data: dict) -> ml_collections.ConfigDict:
    return model_dir.config_from_json(json.dumps(data))


def _shape_change(old_model: dict, new_model: ml_collections.ConfigDict) -> Optional[str]:
    """The first parameter whose shape differs between two model configs, or None."""

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
    models = (old.get("model", {}), new.get("model", {}))
    inert = {d[0] for d in diffs if inert_model_field(d[0], *models)}
    diffs = [d for d in diffs if d[0] not in inert]  # sizes of an encoder neither run uses
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


def schedule_change(config: ml_collections.ConfigDict, changes: list[tuple[str, Any, Any]],
                    step: int) -> Optional[str]:
    """One sentence on a resume that changes the learning-rate schedule, or None.

    `changes` are `check_resume`'s (field, stored, new); `step` is the resumed
    step. The steps before `step` were trained on the stored schedule; from
    `step` on the new one applies, so the rate jumps there (a longer total_steps
    stretches the cosine, for example). States both rates at `step`.
    """
    fields = [(k, a) for k, a, _ in changes if is_schedule(k)]
    if not fields:
        return None

    def rate(lr: dict, total: Any) -> Optional[float]:
        try:
            return float(lr_schedule(lr["base"], lr["multiplier"], lr["warmup_steps"], total,
                                     lr["epoch_steps"])(step))
        except (KeyError, TypeError, ValueError):  # an old record we cannot rebuild
            return None

    new_lr = config.lr.to_dict()
    old_lr, old_total = dict(new_lr), config.total_steps
    for k, a in fields:
        if k == "total_steps":
            old_total = a
        else:
            old_lr[k.split(".", 1)[1]] = a
    before, after = rate(old_lr, old_total), rate(new_lr, config.total_steps)
    what = ", ".join(k for k, _ in fields)
    was = f"{before:.3g}" if before is not None else "unknown"
    now = f"{after:.3g}" if after is not None else "unknown"
    return (f"the learning-rate schedule changes mid-run at step {step} ({what} changed): "
            f"steps before {step} followed the stored schedule, from {step} on the new one "
            f"applies (warm-up {config.lr.warmup_steps} steps, cosine to 0 at step "
            f"{config.total_steps}); the rate at step {step} goes from {was} to {now}")


def record(workdir: str, config: ml_collections.ConfigDict, step: int,
           changes: list[tuple[str, Any, Any]], fresh: bool) -> None:
    """Append this start to config_history.jsonl; write config.json and model_config.json
    when absent or on a fresh start (no checkpoint behind them), config.resume-<step>.json
    on a resume that changed anything (config.json stays the run's first config), and
    model_config.json after an allowed architecture change. Process 0 only; files are
    replaced atomically."""
    if jax.process_index() != 0:
        return
    hist = os.path.join(workdir, HISTORY_FILE)
    first = None  # the first start's config, to rebuild an unreadable config.json
    for path, why in unreadable_files(workdir):  # set aside (bytes kept), rebuilt below
        if path == hist:
            records, _ = _scan_history(hist)
            set_aside(hist, why)
            _write_atomic(hist, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        else:
            set_aside(path, why)
    if os.path.isfile(hist):
        records, _ = _scan_history(hist)
        if records and records[0].get("step") == 0:
            first = records[0]["config"]
    data = config_to_dict(config)
    entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "step": int(step),
             "changes": [{"field": k, "old": a, "new": b} for k, a, b in changes],
             "config": data}
    with open(hist, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    cfg_path = os.path.join(workdir, CONFIG_FILE)
    if fresh:
        _write_atomic(cfg_path, text)
    elif not os.path.exists(cfg_path):  # absent, or set aside above
        _write_atomic(cfg_path, json.dumps(first, indent=2, sort_keys=True)
                      if first is not None else text)
    elif changes:
        # A second resume at the same step replaces the first: it is the config in effect
        # from that step (config_history.jsonl keeps both).
        _write_atomic(os.path.join(workdir, RESUME_CONFIG_FILE.format(step=int(step))), text)
    model_path = os.path.join(workdir, MODEL_CONFIG_FILE)
    model_changed = any(k.startswith("model.") and is_compared(k) for k, _, _ in changes)
    if not (fresh or model_changed) and os.path.exists(model_path):
        problem = _model_config_problem(model_path, config.model)
        if problem:  # the run's config is the authority: set aside, rewritten below
            set_aside(model_path, problem)
    if fresh or not os.path.exists(model_path) or model_changed:
        _write_atomic(model_path, model_dir.config_to_json(config.model))


def _model_config_problem(path: str, model_cfg: ml_collections.ConfigDict) -> Optional[str]:
    """What is wrong with a workdir's model_config.json for the run's model config (None:
    it matches): unreadable, or its first differing architecture field."""
    try:
        stored = model_dir.read_model_config(path)
    except CheckpointError as e:
        return one_line(str(e).replace(f"{path}: ", ""), 200)
    a, b = flatten(stored), flatten(model_cfg)
    models = (stored.to_dict(), model_cfg.to_dict())
    for k in sorted(set(a) | set(b)):
        if inert_model_field(f"model.{k}", *models):
            continue
        if k not in LEGACY_RUNTIME_FIELDS and a.get(k, "<absent>") != b.get(k, "<absent>"):
            return (f"model.{k} is {json.dumps(a.get(k, '<absent>'))}, the run's config has "
                    f"{json.dumps(b.get(k, '<absent>'))}")
    return None


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
