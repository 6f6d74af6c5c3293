"""MSIT with the EDSR-baseline encoder, stage 2 (RIM convs), initialised from stage 1.

    python train.py --config configs/msit_edsr_stage2_rim.py --workdir runs/msit_edsr_stage2 \
        --config.init_from=runs/msit_edsr_stage1 \
        --config.data.train.path=/data/DIV2K/DIV2K_train_HR \
        --config.eval.source.path=/data/DIV2K/DIV2K_valid_HR \
        --config.data.train.cache_dir=/data/DIV2K/_npy_cache

init_from takes a stage-1 workdir (its best checkpoint), a model directory or an
official stage-1 `.pth`: every stage-1 conv kernel becomes a frozen RIM base
kernel W (with its bias), convmap/linear start fresh. Reference
(train_edsr_baseline_MSIT_rim.yaml): as stage 1 but scale ~ U(1, 8).
"""

from msit_jax.training.config import paper_config


def get_config():
    return paper_config("edsr-baseline", stage=2)
