"""Execution options: how a model runs, as opposed to what it computes.

The model config (`msit_jax.models.config`) is the architecture and is what a
checkpoint records. `RuntimeOptions` holds the choices that change speed and
rounding but not the function: matmul/conv precision, compute dtype and the
FFT threshold of the multi-scale convolutions. They come from CLI flags and
training configs (`config.runtime`) and are never written into
`model_config.json`.

Per-platform defaults are resolved when a program is lowered, not when it is
traced (`jax.lax.platform_dependent` in `msit_jax.ops`), so a program lowered
for TPU or CUDA on a CPU-only host is the one a TPU or GPU host would build.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

PRECISIONS = ("highest", "high", "default")
DTYPES = ("float32", "bfloat16")

# FFT threshold 'auto' (-1): on CPU, multi-scale convs from 17x17 run as FFT
# products (measured faster there, forward and backward, on 2 cores); GPUs and
# TPUs keep XLA's convolutions.
FFT_AUTO = -1
CPU_FFT_MIN_KERNEL = 17
# 'auto': per-platform conv kernel gradients (fast CPU methods, XLA's rule on
# GPU/TPU). 'xla': XLA's convolutions and autodiff everywhere (the accelerator
# program, also on CPU; a reference for the CPU methods).
CONV_IMPLS = ("auto", "xla")


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """precision: 'highest' (float32 products, the reference numerics), 'high' or
    'default' (TF32 / bf16 passes on GPU and TPU).
    dtype: compute dtype, 'float32' or 'bfloat16' (parameters stay float32, dots
    accumulate in float32).
    fft_min_kernel: multi-scale convs with kernels at least this large convolve
    by FFT on every platform; 0 never; -1 (default) the per-platform choice.
    conv_impl: 'auto' (default) or 'xla', see CONV_IMPLS.
    s2d_min_kernel: the multi-scale convs (MSNO and Q/K heads) with kernels at least
    this large run on 4x4 pixel blocks folded into channels (`msit_jax.ops.s2d`: 16x
    the output features, to fill an MXU; the same sums, float32 rounding
    differences); 0 (default) never.
    remat_decoder: 0 (default) or N: the per-query decoder runs over chunks of N
    queries, each recomputed in the backward pass (`jax.checkpoint`), so only one
    chunk's largest residuals (the (B, N, 49 * dim) MLP input and the 7x7 K/V
    neighbourhoods) are alive at a time: about one more decoder forward per train
    step for that memory. Same outputs and gradients; for large per-chip batches.
    """

    precision: str = "highest"
    dtype: str = "float32"
    fft_min_kernel: int = FFT_AUTO
    conv_impl: str = "auto"
    s2d_min_kernel: int = 0
    remat_decoder: int = 0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"runtime precision={self.precision!r}, expected one of {PRECISIONS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"runtime dtype={self.dtype!r}, expected one of {DTYPES}")
        if not isinstance(self.fft_min_kernel, int) or self.fft_min_kernel < FFT_AUTO:
            raise ValueError(f"runtime fft_min_kernel={self.fft_min_kernel!r}: expected -1 "
                             "(per platform), 0 (never) or a kernel size")
        if (not isinstance(self.s2d_min_kernel, int) or isinstance(self.s2d_min_kernel, bool)
                or self.s2d_min_kernel < 0):
            raise ValueError(f"runtime s2d_min_kernel={self.s2d_min_kernel!r}: expected 0 "
                             "(never) or a kernel size")
        if (not isinstance(self.remat_decoder, int) or isinstance(self.remat_decoder, bool)
                or self.remat_decoder < 0):
            raise ValueError(f"runtime remat_decoder={self.remat_decoder!r}: expected 0 (off) "
                             "or the queries per recomputed chunk")
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"runtime conv_impl={self.conv_impl!r}, expected one of "
                             f"{CONV_IMPLS}")

    @property
    def lax_precision(self) -> jax.lax.Precision:
        """`precision` as the lax.Precision every contraction of the model carries."""
        return parse_precision(self.precision)

    @property
    def compute_dtype(self) -> jnp.dtype:
        """`dtype` as the jnp dtype of the matmul / conv operands (parameters stay float32)."""
        return jnp.dtype(self.dtype)

    def direct_convs(self) -> "RuntimeOptions":
        """These options with the FFT and pixel-block thresholds off (0): for the convs
        outside the multi-scale heads (encoder, 1x1 projections, conv_vs_0), which the
        thresholds never meant (a threshold of 1 or 3 would otherwise reach them)."""
        return self.replace(fft_min_kernel=0, s2d_min_kernel=0)

    def replace(self, **kw) -> "RuntimeOptions":
        return dataclasses.replace(self, **kw)

    def to_config(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dataclasses.asdict(self))

    @classmethod
    def from_config(cls, c: Any) -> "RuntimeOptions":
        """From a ConfigDict / mapping with any subset of the fields (None: default)."""
        if c is None:
            return cls()
        if isinstance(c, RuntimeOptions):
            return c
        items = c.items() if hasattr(c, "items") else dict(c).items()
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k, _ in items if k not in names)
        if unknown:
            raise ValueError(f"unknown runtime option(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in items if v is not None and v != ""})


def runtime_config() -> ml_collections.ConfigDict:
    """The `runtime` block of training configs (every field present, defaults)."""
    return RuntimeOptions().to_config()


def parse_precision(name: Optional[str]) -> jax.lax.Precision:
    """'highest' | 'high' | 'default' -> lax.Precision. Always explicit (never
    None), so every contraction carries it and the global
    `jax_default_matmul_precision` flag cannot change the model silently."""
    table = {None: jax.lax.Precision.DEFAULT, "default": jax.lax.Precision.DEFAULT,
             "high": jax.lax.Precision.HIGH, "highest": jax.lax.Precision.HIGHEST}
    if name not in table:
        raise ValueError(f"precision={name!r}, expected one of {PRECISIONS}")
    return table[name]
