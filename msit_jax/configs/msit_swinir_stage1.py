"""MSIT with the SwinIR encoder, stage 1 (plain convs), the paper's recipe.

    python train.py --config configs/msit_swinir_stage1.py --workdir runs/msit_swinir_stage1 \
        --config.data.train.path=/data/DIV2K/DIV2K_train_HR \
        --config.eval.source.path=/data/DIV2K/DIV2K_valid_HR \
        --config.data.train.cache_dir=/data/DIV2K/_npy_cache

The official repository ships training YAMLs for EDSR-baseline and RDN only;
this is their recipe (batch 32, 48x48 LR patches, scale ~ U(1, 4), 2304 queries,
Adam 1e-5 warmed up x10 over 50 epochs, cosine to epoch 1050 of 1000 steps)
with LTE's 'swinir' encoder at its only size, i.e. the YAML's
`encoder_spec: {name: swinir, args: {no_upsampling: True}}`
(msit_jax.model_config("swinir")). Then run stage 2:
configs/msit_swinir_stage2_rim.py.
Encoder: SwinIR (embed 180, 6 RSTBs x 6 blocks, 6 heads, window 8, 64 features).
Stochastic depth as LTE: drop_path_rate 0.1 (its per-step rng comes from the step).
"""

from msit_jax.training.config import paper_config


def get_config():
    return paper_config("swinir", stage=1)
