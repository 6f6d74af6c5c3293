"""Train MSIT: `python train.py --config configs/default.py --workdir runs/default`.

The same command as the `msit-train` console script; see msit_jax/training/cli.py
(or `python train.py --help`) for the flags, resume and exit codes.
"""

from msit_jax.training.cli import main

if __name__ == "__main__":
    main()
