"""MSIT with the RCAN encoder, stage 2 (RIM convs), initialised from stage 1.

    python train.py --config configs/msit_rcan_stage2_rim.py --workdir runs/msit_rcan_stage2 \
        --config.init_from=runs/msit_rcan_stage1 \
        --config.data.train.path=/data/DIV2K/DIV2K_train_HR \
        --config.eval.source.path=/data/DIV2K/DIV2K_valid_HR \
        --config.data.train.cache_dir=/data/DIV2K/_npy_cache

init_from takes a stage-1 workdir (its best checkpoint), a model directory or an
official stage-1 `.pth` with the 'rcan' encoder: every stage-1 conv kernel
of the decoder becomes a frozen RIM base kernel W (with its bias), convmap/linear
start fresh. As stage 1 (configs/msit_rcan_stage1.py) but scale ~ U(1, 8), the
official *_rim.yaml recipe.
Encoder: RCAN (10 residual groups x 20 RCABs, 64 features, reduction 16).
"""

from msit_jax.training.config import paper_config


def get_config():
    return paper_config("rcan", stage=2)
