"""MSIT with the RDN encoder, stage 2 (RIM convs), initialised from stage 1.

    python train.py --config configs/msit_rdn_stage2_rim.py --workdir runs/msit_rdn_stage2 \
        --config.init_from=runs/msit_rdn_stage1 \
        --config.data.train.path=/data/DIV2K/DIV2K_train_HR \
        --config.eval.source.path=/data/DIV2K/DIV2K_valid_HR \
        --config.data.train.cache_dir=/data/DIV2K/_npy_cache

Reference (train_rdn_baseline_MSIT_rim.yaml): as stage 1 but scale ~ U(1, 8),
starting from the stage-1 weights (init_from: a stage-1 workdir, model dir or
official stage-1 `.pth`).
"""

from msit_jax.training.config import paper_config


def get_config():
    return paper_config("rdn", stage=2)
