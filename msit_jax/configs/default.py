"""The default: a small MSIT trained on scikit-image's bundled photographs.

    python train.py --config configs/default.py --workdir runs/default

No download: trains on five of scikit-image's colour photographs and holds out
two (`astronaut`, `chelsea`), following the official stage-1 batch protocol
(one scale per batch from U(1, 4), LR by Pillow bicubic) with a smaller model,
LR patch and query count so it finishes in about 5 minutes on 2 CPU cores. It
ends with a PSNR table, MSIT vs bicubic at x2, x3, x4 and x6 on the held-out
images, and a side-by-side PNG (WORKDIR/demo_x4.png).
"""

from msit_jax.models.config import tiny_model_config
from msit_jax.training.config import base_config, source_config


def get_config():
    c = base_config()
    c.seed = 0
    m = tiny_model_config("edsr-baseline", conv="plain")
    m.edsr.update(n_resblocks=2, n_feats=16)
    m.update(dim=32, heads=4, radius=1, msno_heads=4, qk_heads=2, mlp_hidden=(64, 64),
             posenc_dims=16)
    c.model = m

    c.batch_size = 4
    c.total_steps = 1500
    c.lr.update(base=2e-4, multiplier=10.0, warmup_steps=100, epoch_steps=0)

    c.data.train = source_config("embedded", split="train")
    c.data.update(inp_size=32, sample_q=1024, scale_min=1.0, scale_max=4.0, repeat=1,
                  num_workers=0, num_threads=1, buffer_size=2, device_buffer=2)

    c.eval.source = source_config("embedded", split="val")
    # Central 256x256 crops of the held-out images keep the final evaluation to
    # seconds (whole images: compiles for 8 input sizes instead of 4).
    c.eval.update(every_steps=500, scales=(2.0, 3.0, 4.0), max_images=0, max_side=256,
                  shave_extra=0, chunk=8192)
    c.checkpoint.update(every_steps=250, keep=2)
    c.log_every_steps = 50
    c.demo.update(enabled=True, scales=(2.0, 3.0, 4.0, 6.0), png_scale=4.0, window=192)
    return c
