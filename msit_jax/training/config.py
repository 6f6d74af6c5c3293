"""The training config skeleton shared by `configs/*.py` (ml_collections).

Every field, with `--config.<field>=value` overridable on the command line:

  seed                 int; model init and data order (batches are a function of (seed, step))
  model                model config: the architecture (see `msit_jax.config`)
  runtime.precision, runtime.dtype, runtime.fft_min_kernel
                       execution options (see `msit_jax.runtime`): 'highest' | 'high' |
                       'default'; 'float32' | 'bfloat16'; -1 (per platform) | 0 | k
  batch_size           global batch (all devices, all hosts)
  total_steps          optimizer steps; the LR schedule ends here
  lr.base, lr.multiplier, lr.warmup_steps, lr.epoch_steps
                       see `msit_jax.training.schedule` (reference: 1e-5, 10, 50 epochs,
                       1000 steps per epoch)
  adam.b1, adam.b2, adam.eps   torch Adam defaults
  grad_clip_norm       clip by global norm when > 0 (the reference does not clip)
  init_from            '' or a stage-1 workdir / model dir / official .pth (stage 2)
  data.train           the training source: kind = 'embedded' | 'folder' | 'tfds'
                         embedded: split; folder: path, meta_info, first_k,
                         skip_bad_images, cache_dir; tfds: name, split, data_dir,
                         image_key, first_k
  data.inp_size, data.sample_q, data.scale_min, data.scale_max, data.augment
                       the batch protocol (reference: 48, 2304, 1, 4 or 8, True)
  data.repeat          images per epoch = repeat x dataset size (reference: 40)
  data.num_workers     grain worker processes (0: in the training process)
  data.num_threads     threads per worker (Pillow decode/resize release the GIL)
  data.buffer_size, data.device_buffer   host / device prefetch depth (batches)
  eval.source          validation source (same fields as data.train)
  eval.every_steps     validation PSNR period (0: never during training)
  eval.scales, eval.max_images, eval.max_side, eval.shave_extra, eval.y_channel,
  eval.chunk, eval.method   see `msit_jax.training.evaluate` (chunk 0: per platform)
  checkpoint.every_steps, checkpoint.keep, checkpoint.keep_best, checkpoint.async_save
  log_every_steps      train metrics period
  progress_bar         tqdm bar on process 0
  tensorboard          also write TensorBoard files (tensorboardX)
  demo.enabled, demo.scales, demo.png_scale, demo.window
                       end-of-run table (MSIT vs bicubic on eval.source) and PNG
  distributed.enabled, distributed.coordinator_address, distributed.num_processes,
  distributed.process_id
                       multi-host: jax.distributed.initialize (on Cloud TPU leave the
                       rest empty: it is detected)
"""

from __future__ import annotations

import ml_collections

from msit_jax.config import model_config
from msit_jax.runtime import runtime_config


def source_config(kind: str = "embedded", **kw) -> ml_collections.ConfigDict:
    """A data-source block with every field present (so any can be overridden)."""
    c = ml_collections.ConfigDict(dict(
        kind=kind, split="train", path="", meta_info="", first_k=0, skip_bad_images=False,
        cache_dir="", name="", data_dir="", image_key="hr"))
    c.update(kw)
    return c


def base_config() -> ml_collections.ConfigDict:
    """The reference's stage-1 EDSR-baseline recipe on DIV2K; configs adjust it."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_config("edsr-baseline", conv="plain")
    c.runtime = runtime_config()
    c.batch_size = 32
    # 1050 epochs of 800 images x 40 repeats / batch 32 = 1000 steps per epoch.
    c.total_steps = 1_050_000
    c.lr = ml_collections.ConfigDict(dict(base=1e-5, multiplier=10.0, warmup_steps=50_000,
                                          epoch_steps=1000))
    c.adam = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8))
    c.grad_clip_norm = 0.0
    c.init_from = ""

    c.data = ml_collections.ConfigDict()
    c.data.train = source_config("folder", path="data/DIV2K/DIV2K_train_HR")
    c.data.inp_size = 48
    c.data.sample_q = 2304
    c.data.scale_min = 1.0
    c.data.scale_max = 4.0
    c.data.augment = True
    c.data.repeat = 40
    c.data.num_workers = 8
    c.data.num_threads = 2
    c.data.buffer_size = 2
    c.data.device_buffer = 2

    c.eval = ml_collections.ConfigDict()
    c.eval.source = source_config("folder", path="data/DIV2K/DIV2K_valid_HR", first_k=10)
    c.eval.every_steps = 50_000  # the reference validates every 50 epochs
    c.eval.scales = (2.0, 3.0, 4.0)
    c.eval.max_images = 10
    c.eval.max_side = 0
    c.eval.shave_extra = 6  # DIV2K protocol: shave scale + 6
    c.eval.y_channel = False
    c.eval.chunk = 0  # queries per decoder call; 0: per platform (4096 on CPU)
    c.eval.method = "auto"  # decoder: 'auto' | 'grid' | 'query' (msit_jax.inference.Upscaler)

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=5000, keep=3, keep_best=True,
                                                  async_save=True))
    c.log_every_steps = 100
    c.progress_bar = True
    c.tensorboard = True
    c.demo = ml_collections.ConfigDict(dict(enabled=False, scales=(2.0, 3.0, 4.0, 6.0),
                                            png_scale=4.0, window=192))
    c.distributed = ml_collections.ConfigDict(dict(enabled=False, coordinator_address="",
                                                   num_processes=0, process_id=-1))
    return c


def paper_config(encoder: str, stage: int) -> ml_collections.ConfigDict:
    """The reference's cumulative recipe for one encoder ('edsr-baseline' | 'rdn').

    Stage 1: plain convs, scale ~ U(1, 4). Stage 2: RIM convs, scale ~ U(1, 8),
    started from the stage-1 run via `init_from` (given on the command line).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    c = base_config()
    c.model = model_config(encoder, conv="plain" if stage == 1 else "rim")
    if stage == 2:
        c.data.scale_max = 8.0
    return c
