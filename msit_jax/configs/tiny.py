"""A tiny config for tests: every component, seconds per run on CPU.

    python train.py --config configs/tiny.py --workdir /tmp/msit_tiny
"""

from msit_jax.models.config import tiny_model_config
from msit_jax.training.config import base_config, source_config


def get_config():
    c = base_config()
    c.model = tiny_model_config("edsr-baseline", conv="plain")
    # Fewer scale heads and a narrower decoder than the model tests' tiny config:
    # the same components, half the XLA compile time of the train step.
    c.model.update(dim=16, heads=2, msno_heads=2, qk_heads=1, mlp_hidden=(8,), posenc_dims=8)
    c.batch_size = 8
    c.total_steps = 4
    c.lr.update(base=1e-5, multiplier=10.0, warmup_steps=2, epoch_steps=0)  # the reference lr
    c.data.train = source_config("embedded", split="train")
    c.data.update(inp_size=12, sample_q=32, scale_min=1.0, scale_max=4.0, repeat=1,
                  num_workers=0, num_threads=0, buffer_size=1, device_buffer=1)
    c.eval.source = source_config("embedded", split="val")
    c.eval.update(every_steps=0, scales=(2.0,), max_images=1, max_side=48, shave_extra=0)
    c.checkpoint.update(every_steps=2, keep=2)
    c.log_every_steps = 1
    c.progress_bar = False
    c.tensorboard = False
    c.demo.enabled = False
    return c
