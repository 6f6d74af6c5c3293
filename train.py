"""Train MSIT.

    python train.py --config configs/default.py --workdir runs/default
    python train.py --config configs/msit_edsr_stage1.py --workdir runs/edsr_s1 \
        --config.data.train.path=/data/DIV2K/DIV2K_train_HR
    python train.py --config configs/msit_edsr_stage2_rim.py --workdir runs/edsr_s2 \
        --config.init_from=runs/edsr_s1

Any config field can be overridden with --config.<field>=value (see
msit_jax/training/config.py for the list). Re-running a command on an existing
workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the demo output "
                    "(created with its parents; an existing one is resumed).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Our progress lines at INFO; libraries (Orbax logs every file it writes) at WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("msit_jax").setLevel(logging.INFO)
    from msit_jax.training import train_and_evaluate

    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
