"""Train MSIT.

    python train.py --config configs/default.py --workdir runs/default
    python train.py --config configs/msit_edsr_stage1.py --workdir runs/edsr_s1 \
        --config.data.train.path=/data/DIV2K/DIV2K_train_HR
    python train.py --config configs/msit_edsr_stage2_rim.py --workdir runs/edsr_s2 \
        --config.init_from=runs/edsr_s1

Any config field can be overridden with --config.<field>=value (see
msit_jax/training/config.py for the list). Re-running a command on an existing
workdir resumes from its latest good checkpoint (see docs/training.md).

Errors are one line (`error: ...`) naming the file, flag or field, with the
exit codes of `msit_jax.errors` (3 config, 4 data, 5 checkpoint, 6 non-finite,
7 output, 143 / 130 after SIGTERM / SIGINT once a checkpoint is saved);
--verbose adds the traceback.
"""

from __future__ import annotations

import logging
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from msit_jax import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the demo output "
                    "(created with its parents; an existing one is resumed).")
flags.DEFINE_bool("verbose", False, "Print the traceback of an error.")
flags.mark_flags_as_required(["config", "workdir"])


def _verbose_requested(argv: list[str]) -> bool:
    return any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (exit 2; 3 for a config field)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        msg = errors.one_line(str(e))
        code = errors.EXIT_CONFIG if "--config." in msg else errors.EXIT_USAGE
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(code)
    except Exception as e:  # noqa: BLE001 - the config file or an override failed
        if _verbose_requested(argv):
            raise
        # ml_collections raises AttributeError / KeyError "'name'" for an unknown field.
        name = str(e).strip("\"'")
        override = next((a for a in argv[1:] if re.match(rf"--config\.(\S+\.)?{re.escape(name)}"
                                                         r"(=|$)", a)), None)
        if override is not None and isinstance(e, (AttributeError, KeyError)):
            field = override.split("=", 1)[0][len("--config."):]
            print(f"error: unknown config field {field!r} in {override}; see "
                  "msit_jax/training/config.py for the fields", file=sys.stderr)
            sys.exit(errors.EXIT_CONFIG)
        print(f"error: --config: {errors.describe(e)}", file=sys.stderr)
        sys.exit(errors.EXIT_CONFIG)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return errors.EXIT_USAGE
    # Our progress lines at INFO; libraries (Orbax logs every file it writes) at WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("msit_jax").setLevel(logging.INFO)
    try:
        from msit_jax.training import train_and_evaluate

        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - one line, see msit_jax.errors
        return errors.report(e, FLAGS.verbose)
    return errors.EXIT_OK


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
