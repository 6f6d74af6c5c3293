"""Backend-specific kernels behind backend-neutral functions.

Everything platform-specific in the model lives here and is chosen with
`jax.lax.platform_dependent` when a program is lowered, never by probing the
backend while tracing.
"""

from msit_jax.ops.conv import conv2d, conv2d_fft, cpu_kernel_method, lax_conv, smooth_size
from msit_jax.ops.matmul import dot, einsum

__all__ = ["conv2d", "conv2d_fft", "cpu_kernel_method", "dot", "einsum", "lax_conv",
           "smooth_size"]
