"""MSIT with the EDSR (full) encoder, stage 1 (plain convs), the paper's recipe.

    python train.py --config configs/msit_edsr_full_stage1.py --workdir runs/msit_edsr_full_stage1 \
        --config.data.train.path=/data/DIV2K/DIV2K_train_HR \
        --config.eval.source.path=/data/DIV2K/DIV2K_valid_HR \
        --config.data.train.cache_dir=/data/DIV2K/_npy_cache

The official repository ships training YAMLs for EDSR-baseline and RDN only;
this is their recipe (batch 32, 48x48 LR patches, scale ~ U(1, 4), 2304 queries,
Adam 1e-5 warmed up x10 over 50 epochs, cosine to epoch 1050 of 1000 steps)
with the official 'edsr' encoder at its defaults, i.e. the YAML's
`encoder_spec: {name: edsr, args: {no_upsampling: True}}`
(msit_jax.model_config("edsr")). Then run stage 2:
configs/msit_edsr_full_stage2_rim.py.
Encoder: EDSR (full: 32 residual blocks x 256 features, res_scale 0.1).
"""

from msit_jax.training.config import paper_config


def get_config():
    return paper_config("edsr", stage=1)
