"""MSIT with the SwinIR encoder, stage 2 (RIM convs), initialised from stage 1.

    python train.py --config configs/msit_swinir_stage2_rim.py --workdir runs/msit_swinir_stage2 \
        --config.init_from=runs/msit_swinir_stage1 \
        --config.data.train.path=/data/DIV2K/DIV2K_train_HR \
        --config.eval.source.path=/data/DIV2K/DIV2K_valid_HR \
        --config.data.train.cache_dir=/data/DIV2K/_npy_cache

init_from takes a stage-1 workdir (its best checkpoint), a model directory or an
official stage-1 `.pth` with the 'swinir' encoder: every stage-1 conv kernel
of the decoder becomes a frozen RIM base kernel W (with its bias), convmap/linear
start fresh (the encoder is copied as it is). As stage 1
(configs/msit_swinir_stage1.py) but scale ~ U(1, 8), the official *_rim.yaml recipe.
Encoder: SwinIR (embed 180, 6 RSTBs x 6 blocks, 6 heads, window 8, 64 features).
"""

from msit_jax.training.config import paper_config


def get_config():
    return paper_config("swinir", stage=2)
