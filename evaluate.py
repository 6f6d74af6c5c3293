"""Evaluate MSIT or the bicubic baseline: `python evaluate.py --help`.

    python evaluate.py --checkpoint epoch-best.pth --data set5 --data_root ~/sr-data
    python evaluate.py --model bicubic --data data/Set5 --scales 2,3,4

The command is `msit_jax.eval.cli` (also installed as `msit-evaluate`); see
docs/evaluation.md.
"""

from msit_jax.eval.cli import main

if __name__ == "__main__":
    main()
