"""Model checkpoint directories: a model config and its variables, for inference or export.

    path = save_model("ckpt/", model_cfg, variables)
    model_cfg, variables = load_model("ckpt/")

Layout:
  DIR/model_config.json   the model config (ml_collections, as JSON)
  DIR/variables/          Orbax StandardCheckpointer tree {'params', 'frozen', 'batch_stats'}

Loading validates what it reads: the config's fields and values; the config's
sizes against the arrays the Orbax metadata describes, before anything is restored
or built (`msit_jax.io.config_check`); every variable's presence and shape against
the config, and that every value is finite; a problem raises `CheckpointError`
naming the file (one line).

Not to be confused with a training workdir (train state, optimizer and data
iterator state at several steps): `msit_jax.io.workdir` reads its model,
`msit_jax.training.checkpoints` writes and resumes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from msit_jax.errors import CheckpointError, OutputError, one_line
from msit_jax.io import config_check
from msit_jax.models.config import LEGACY_RUNTIME_FIELDS, model_config, validate_model_config
from msit_jax.models.model import variable_shapes

CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"


def _is_closed_loop_noise(unraisable: Any) -> bool:
    return (isinstance(unraisable.exc_value, RuntimeError)
            and "Event loop is closed" in str(unraisable.exc_value))


@contextlib.contextmanager
def quiet_orbax(settle_s: float = 0.5, max_wait_s: float = 5.0) -> Iterator[None]:
    """Silence Orbax/asyncio error logs (a traceback per failed read or write task) while
    a restore or save is attempted: the caller reports a failure once, in one line.

    When the block fails, the other tensor reads/writes of the aborted operation still
    complete afterwards, each raising 'Event loop is closed' into
    `sys.unraisablehook` (a traceback apiece); until they have stopped (no new one for
    `settle_s`, at most `max_wait_s`) those are dropped too. Everything is restored on
    exit: the logger levels and the previous hook.
    """
    loggers = [logging.getLogger(n) for n in ("absl", "asyncio", "orbax", "tensorstore")]
    levels = [lg.level for lg in loggers]
    previous_hook = sys.unraisablehook
    last = [0.0]

    def hook(unraisable) -> None:
        if _is_closed_loop_noise(unraisable):
            last[0] = time.monotonic()
        else:
            previous_hook(unraisable)

    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sys.unraisablehook = hook
    failed = True
    try:
        yield
        failed = False
    finally:
        if failed:
            t0 = last[0] = time.monotonic()
            while (time.monotonic() - last[0] < settle_s
                   and time.monotonic() - t0 < max_wait_s):
                time.sleep(0.05)
        sys.unraisablehook = previous_hook
        for lg, lv in zip(loggers, levels):
            # After a failure, the aborted operation's futures may be garbage
            # collected later (even at exit), and asyncio logs each one ("Future
            # exception was never retrieved"): the failure was already reported
            # in one line, so asyncio stays quiet for the rest of the process.
            if not (failed and lg.name == "asyncio"):
                lg.setLevel(lv)


def short_error(e: BaseException) -> str:
    """An Orbax/tensorstore exception as one short line: its innermost distinct message."""
    msgs: list[str] = []
    seen = set()
    while e is not None and id(e) not in seen and len(msgs) < 6:
        seen.add(id(e))
        m = one_line(str(e), 600)
        if m and m not in msgs:
            msgs.append(m if msgs else f"{type(e).__name__}: {m}")
        e = e.__cause__ or e.__context__
    return one_line(msgs[-1] if msgs else "unknown error", 600)


def config_to_json(model_cfg: ml_collections.ConfigDict) -> str:
    return model_cfg.to_json(indent=2, sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """A model config from model_config.json. Files written before execution
    options left the model config still carry precision/dtype/fft_min_kernel:
    those are ignored (they never changed the function, only how it ran)."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    for k in LEGACY_RUNTIME_FIELDS:
        data.pop(k, None)
    cfg = model_config()
    unknown = set(data) - set(cfg.keys())
    if unknown:
        raise ValueError(f"unknown model config fields {sorted(unknown)}")
    for k, v in data.items():
        if isinstance(v, list):
            v = tuple(v)
        if isinstance(v, dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    return cfg


def read_model_config(path: str) -> ml_collections.ConfigDict:
    """A validated model config from a model_config.json; CheckpointError naming the file."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})", path=path) from e
    try:
        cfg = config_from_json(text)
        validate_model_config(cfg)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})", path=path) from None
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise CheckpointError(f"{path}: {one_line(str(e))}", path=path) from None
    return cfg


def to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: np.asarray(x), tree)


def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(
        os.path.join(path, VARIABLES_DIR))


def shape_differences(want: Mapping[str, Sequence[int]], got: Mapping[str, Sequence[int]]
                      ) -> tuple[list[str], list[str], list[str]]:
    """Two {path: shape} tables compared: (paths whose shapes differ, paths only in
    `want`, paths only in `got`), each sorted."""
    shapes = [k for k in sorted(want) if k in got and tuple(got[k]) != tuple(want[k])]
    return shapes, sorted(set(want) - set(got)), sorted(set(got) - set(want))


def check_variables(model_cfg: ml_collections.ConfigDict, variables: Any, where: str) -> None:
    """CheckpointError naming `where` unless `variables` holds exactly the config's
    variables, with their shapes, all finite."""

    def flat(tree, prefix=""):
        out = {}
        for k, v in (tree.items() if hasattr(tree, "items") else ()):
            if hasattr(v, "items"):
                out.update(flat(v, f"{prefix}{k}/"))
            else:
                out[f"{prefix}{k}"] = v
        return out

    want = {k: tuple(v) for k, v in flat(variable_shapes(model_cfg)).items()}
    got = flat(variables)
    shapes, missing, extra = shape_differences(want, {k: np.shape(v) for k, v in got.items()})
    if missing or extra or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatch(es), first {k}: {tuple(np.shape(got[k]))} "
                         f"stored, {want[k]} for the config")
        if missing:
            parts.append(f"{len(missing)} missing, first {missing[0]}")
        if extra:
            parts.append(f"{len(extra)} unexpected, first {extra[0]}")
        raise CheckpointError(f"{where}: the variables do not match its {CONFIG_FILE} "
                              f"(encoder={model_cfg.encoder}, dim={model_cfg.dim}, "
                              f"conv={model_cfg.conv}): " + "; ".join(parts), path=where)
    for k in sorted(got):
        a = np.asarray(got[k])
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            n = int(a.size - np.count_nonzero(np.isfinite(a)))
            raise CheckpointError(f"{where}: {k} holds {n} non-finite value(s) (NaN/inf): "
                                  "the weights are corrupt", path=where)


def save_model(path: str, model_cfg: ml_collections.ConfigDict, variables: Any) -> str:
    """Write a model checkpoint directory (created; must not already hold one).

    A failed write (disk full, permissions) raises OutputError in one line and
    removes what it had written."""
    path = os.path.abspath(path)
    if is_model_dir(path):
        raise OutputError(f"{path} already holds a model checkpoint")
    var_dir = os.path.join(path, VARIABLES_DIR)
    if os.path.exists(var_dir):
        raise OutputError(f"{var_dir} already exists (a partial checkpoint?): remove it first")
    created_dir = not os.path.exists(path)
    try:
        os.makedirs(path, exist_ok=True)
        with quiet_orbax():
            ckptr = ocp.StandardCheckpointer()
            ckptr.save(var_dir, to_numpy(dict(variables)))
            ckptr.wait_until_finished()
        tmp = os.path.join(path, CONFIG_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(config_to_json(model_cfg))
        os.replace(tmp, os.path.join(path, CONFIG_FILE))
    except Exception as e:  # noqa: BLE001 - report any write failure in one line
        # Remove what this call wrote: the variables (Orbax writes them under a
        # temporary name first), the config, and the directory if it is left empty.
        for name in os.listdir(path) if os.path.isdir(path) else []:
            if name == VARIABLES_DIR or name.startswith(VARIABLES_DIR + ".orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)
        with contextlib.suppress(OSError):
            os.remove(os.path.join(path, CONFIG_FILE + ".tmp"))
        if created_dir and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        raise OutputError(f"could not write the model checkpoint {path}: {short_error(e)}") \
            from e
    return path


def load_model(path: str) -> tuple[ml_collections.ConfigDict, dict]:
    """Read and validate a model checkpoint directory written by `save_model`."""
    path = os.path.abspath(path)
    if not is_model_dir(path):
        raise FileNotFoundError(
            f"{path} is not a msit-jax model checkpoint (expected {CONFIG_FILE} and "
            f"{VARIABLES_DIR}/ inside)")
    cfg = read_model_config(os.path.join(path, CONFIG_FILE))
    var_dir = os.path.join(path, VARIABLES_DIR)
    # The config is untrusted: before anything is restored or built for it, its sizes
    # must be those of the stored arrays (read from the checkpoint metadata).
    stored = stored_tensors(var_dir)
    if stored is not None:
        config_check.check(cfg, stored, var_dir, f"its {CONFIG_FILE}")
    try:
        with quiet_orbax():
            variables = ocp.StandardCheckpointer().restore(var_dir)
    except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt checkpoint
        raise CheckpointError(f"{var_dir}: cannot be restored ({short_error(e)})",
                              path=var_dir) from e
    variables = to_numpy(variables)
    if stored is None:  # no readable metadata: check the restored arrays instead
        config_check.check(cfg, config_check.official_names(variables), var_dir,
                           f"its {CONFIG_FILE}")
    check_variables(cfg, variables, var_dir)
    return cfg, variables


def stored_tensors(var_dir: str) -> Optional[dict[str, config_check.Tensor]]:
    """What the Orbax checkpoint metadata of `var_dir` says about its arrays (names,
    shapes, dtypes; nothing restored), for `config_check`; None when it has none
    readable (the restore then decides whether the checkpoint is usable)."""
    try:
        with quiet_orbax():
            meta = ocp.StandardCheckpointer().metadata(var_dir)
        tree = getattr(meta, "item_metadata", meta)
        tensors = config_check.official_names(tree)
    except Exception:  # noqa: BLE001 - unreadable metadata: fall back to the restore
        return None
    return tensors or None
