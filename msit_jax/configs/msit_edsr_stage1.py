"""MSIT with the EDSR-baseline encoder, stage 1 (plain convs), the paper's recipe.

    python train.py --config configs/msit_edsr_stage1.py --workdir runs/msit_edsr_stage1 \
        --config.data.train.path=/data/DIV2K/DIV2K_train_HR \
        --config.eval.source.path=/data/DIV2K/DIV2K_valid_HR \
        --config.data.train.cache_dir=/data/DIV2K/_npy_cache

Reference (configs/train/train_edsr_baseline_MSIT.yaml): DIV2K train HR x 40 per
epoch, batch 32, 48x48 LR patches, scale ~ U(1, 4), 2304 queries, Adam 1e-5
warmed up x10 over 50 epochs then cosine to epoch 1050; 1000 steps per epoch,
so 1.05M steps. Validation on the first 10 DIV2K validation images at x2/x3/x4
(RGB PSNR, shave scale + 6) every 50 epochs; the best checkpoint is kept.
Then run stage 2: configs/msit_edsr_stage2_rim.py.
"""

from msit_jax.training.config import paper_config


def get_config():
    return paper_config("edsr-baseline", stage=1)
