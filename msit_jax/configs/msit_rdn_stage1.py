"""MSIT with the RDN encoder, stage 1 (plain convs), the paper's recipe.

    python train.py --config configs/msit_rdn_stage1.py --workdir runs/msit_rdn_stage1 \
        --config.data.train.path=/data/DIV2K/DIV2K_train_HR \
        --config.eval.source.path=/data/DIV2K/DIV2K_valid_HR \
        --config.data.train.cache_dir=/data/DIV2K/_npy_cache

Reference (configs/train/train_rdn_baseline_MSIT.yaml): as the EDSR recipe
(batch 32, 48x48, U(1, 4), 2304 queries, Adam 1e-5 x10 warm-up 50 epochs,
cosine to 1050 epochs of 1000 steps) with the RDN (config B) encoder.
Then run stage 2: configs/msit_rdn_stage2_rim.py.
"""

from msit_jax.training.config import paper_config


def get_config():
    return paper_config("rdn", stage=1)
