"""SwinIR feature encoder (no upsampler), as LTE/CLIT train it. NHWC in and out.

    (B, H, W, 3) -> (B, H, W, num_feat)        num_feat = 64 at LTE's size

The computation (SwinIR, Liang et al. 2021, with upsampler 'none' as in LTE's
`models/swinir.py`, whose `make_swinir` ignores its arguments and builds the
paper size: embed 180, six RSTBs of six blocks, 6 heads, window 8, MLP ratio 2):

    x  = reflect-pad(x) to a multiple of window_size (bottom/right)
    f  = conv_first(x)                                  3x3, 3 -> embed
    t  = LayerNorm(f)                                   patch embed (patch_norm)
    t  = RSTB_i(t) for each stage i                     see `RSTB`
    t  = LayerNorm(t)
    y  = conv_after_body(t) + f                         '1conv': one 3x3
    out = LeakyReLU_0.01(conv_before_upsample(y))       3x3, embed -> num_feat
    out = out[:, :H, :W]                                crop back

There is no mean shift and no img_range scaling: LTE comments them out (its
inputs are already normalised to [-1, 1]). LTE's own forward pads but does not
crop (its features come out at the padded size; its test script pads the image
itself and crops the prediction). Here the features are cropped back to H x W,
so the encoder keeps the (B, H, W, C) contract of the other encoders; the
cropped values equal LTE's features at those pixels.

Patch size is 1 (patch embed/unembed are reshapes, the identity in NHWC), there
is no absolute position embedding (ape=False). qk_scale is head_dim ** -0.5.
SwinIR shrinks the window and drops the shift when its *construction* size
img_size is <= window_size; LTE builds it with img_size 48, so every second
block is shifted whatever the input size, as here.

Numerics: LayerNorms (eps 1e-5), softmax and the residual stream are float32;
matmul and conv operands are in the compute `dtype` with float32 accumulation
(`msit_jax.ops`). Convs are `msit_jax.models.layers.Conv`; every module takes the
execution options as one `runtime` field (`msit_jax.ops.runtime.RuntimeOptions`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msit_jax import ops
from msit_jax.models.layers import Conv, gelu
from msit_jax.ops.runtime import RuntimeOptions

Array = jax.Array

# LTE's `make_swinir()` (the SwinIR constructor defaults), under SwinIR's
# argument names. drop_path_rate is stochastic depth in training (0.1 in LTE);
# it has no effect at inference.
SWINIR_DEFAULTS = dict(
    embed_dim=180,
    depths=(6, 6, 6, 6, 6, 6),
    num_heads=(6, 6, 6, 6, 6, 6),
    window_size=8,
    mlp_ratio=2.0,
    qkv_bias=True,
    patch_norm=True,
    resi_connection="1conv",
    num_feat=64,
    drop_path_rate=0.1,
)

# SwinIR's shifted-window mask value between tokens of different regions.
MASK_VALUE = -100.0
LN_EPS = 1e-5
# LeakyReLU slopes: nn.LeakyReLU() default after conv_before_upsample, 0.2 in '3conv'.
OUT_SLOPE = 0.01
CONV3_SLOPE = 0.2


def relative_position_index(window_size: int) -> np.ndarray:
    """(N, N) int index into the (2w-1)^2 bias table, N = w*w tokens row-major:
    (dy + w - 1) * (2w - 1) + (dx + w - 1) for the offset (dy, dx) of query from key."""
    w = window_size
    ys, xs = np.meshgrid(np.arange(w), np.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + (w - 1)
    dx = xs[:, None] - xs[None, :] + (w - 1)
    return (dy * (2 * w - 1) + dx).astype(np.int64)


def shift_attention_mask(hp: int, wp: int, window_size: int, shift: int) -> np.ndarray:
    """Additive mask of the shifted windows of an hp x wp map: (nW, N, N), 0 or -100.

    After the cyclic shift by -shift, each window may hold pixels of up to 3 x 3
    regions (row bands [0, hp-w), [hp-w, hp-shift), [hp-shift, hp), same for
    columns); tokens attend only within their region. Windows in row-major order.
    """
    w = window_size
    region = np.zeros((hp, wp), np.int64)
    bands_h = (0, hp - w, hp - shift, hp)
    bands_w = (0, wp - w, wp - shift, wp)
    for i in range(3):
        for j in range(3):
            region[max(bands_h[i], 0):bands_h[i + 1], max(bands_w[j], 0):bands_w[j + 1]] = i * 3 + j
    win = region.reshape(hp // w, w, wp // w, w).transpose(0, 2, 1, 3).reshape(-1, w * w)
    diff = win[:, None, :] != win[:, :, None]
    return np.where(diff, np.float32(MASK_VALUE), np.float32(0.0)).astype(np.float32)


def _concrete(*dims) -> bool:
    return all(isinstance(d, (int, np.integer)) for d in dims)


def attention_mask(hp, wp, window_size: int, shift: int):
    """`shift_attention_mask` for any map size: numpy for concrete sizes, else the same
    values computed with jnp from symbolic (shape-polymorphic export) sizes."""
    if _concrete(hp, wp):
        return shift_attention_mask(int(hp), int(wp), window_size, shift)
    w = window_size

    def bands(n):
        p = jnp.arange(n)
        return jnp.where(p < n - w, 0, jnp.where(p < n - shift, 1, 2))

    region = bands(hp)[:, None] * 3 + bands(wp)[None, :]
    win = region.reshape(hp // w, w, wp // w, w).transpose(0, 2, 1, 3).reshape(-1, w * w)
    return jnp.where(win[:, None, :] != win[:, :, None], jnp.float32(MASK_VALUE),
                     jnp.float32(0.0))


def _reflect_pad(x: Array, ph, pw) -> Array:
    """Reflect-pad (B, H, W, C) by ph rows and pw columns at the bottom/right (torch's
    'reflect'); symbolic sizes (shape-polymorphic export) pad by gathering the
    reflected rows/columns, which needs H > ph and W > pw as torch does."""
    if _concrete(ph, pw):
        if ph or pw:
            x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
        return x
    for axis, p in ((1, ph), (2, pw)):
        n = x.shape[axis]
        x = jnp.concatenate([x, jnp.take(x, (n - 2) - jnp.arange(p), axis=axis)], axis=axis)
    return x


def _trunc_normal_02(key, shape, dtype=jnp.float32):
    # timm's trunc_normal_(std=.02) truncates at +-2 (absolute), i.e. at 100 std:
    # in effect N(0, 0.02^2).
    return jnp.clip(0.02 * jax.random.normal(key, shape, dtype), -2.0, 2.0)


class Linear(nn.Module):
    """torch.nn.Linear with SwinIR's init (trunc-normal 0.02 weight, zero bias).
    x (..., in) -> (..., features) float32; kernel (in, features)."""

    features: int
    use_bias: bool = True
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", _trunc_normal_02, (x.shape[-1], self.features), jnp.float32)
        dtype = self.runtime.compute_dtype
        y = ops.dot(x.astype(dtype), kernel.astype(dtype), self.runtime.lax_precision)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return y


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, computed in float32 (eps 1e-5)."""

    eps: float = LN_EPS

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a relative position bias.

    x (B, nW, N, C) tokens of nW windows of N = w*w tokens; mask None or
    (nW, N, N) additive -> (B, nW, N, C) float32.
    """

    dim: int
    window_size: int
    num_heads: int
    qkv_bias: bool = True
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array, mask: Optional[np.ndarray]) -> Array:
        b, nw, n, c = x.shape
        h = self.num_heads
        hd = c // h
        w = self.window_size
        table = self.param("relative_position_bias_table", _trunc_normal_02,
                           ((2 * w - 1) ** 2, h), jnp.float32)
        kw = dict(runtime=self.runtime)
        dtype, prec = self.runtime.compute_dtype, self.runtime.lax_precision
        qkv = Linear(3 * c, self.qkv_bias, name="qkv", **kw)(x).reshape(b, nw, n, 3, h, hd)
        q = qkv[..., 0, :, :] * (hd ** -0.5)
        k, v = qkv[..., 1, :, :], qkv[..., 2, :, :]
        attn = ops.einsum("bwqhd,bwkhd->bwhqk", q.astype(dtype), k.astype(dtype), prec)
        bias = table[relative_position_index(w).reshape(-1)].reshape(n, n, h)
        attn = attn + jnp.transpose(bias, (2, 0, 1))
        if mask is not None:
            attn = attn + jnp.asarray(mask)[None, :, None]
        attn = jax.nn.softmax(attn, axis=-1)
        out = ops.einsum("bwhqk,bwkhd->bwqhd", attn.astype(dtype), v.astype(dtype),
                         prec).reshape(b, nw, n, c)
        return Linear(c, name="proj", **kw)(out)


def _drop_path(module: nn.Module, x: Array, rate: float, train: bool) -> Array:
    """Stochastic depth (per sample) in training; the identity otherwise."""
    if not train or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0)


class SwinBlock(nn.Module):
    """Swin transformer block on a (B, Hp, Wp, C) map, Hp and Wp multiples of the window:

        x = x + W-MSA(LN(x))      (cyclically shifted by -shift first, masked, shifted back)
        x = x + MLP(LN(x))        Linear -> GELU(erf) -> Linear, hidden C * mlp_ratio
    """

    dim: int
    num_heads: int
    window_size: int
    shift: int
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        bsz, hp, wp, c = x.shape
        w, s = self.window_size, self.shift
        kw = dict(runtime=self.runtime)
        y = LayerNorm(name="norm1")(x)
        if s:
            y = jnp.roll(y, (-s, -s), axis=(1, 2))
        y = y.reshape(bsz, hp // w, w, wp // w, w, c).transpose(0, 1, 3, 2, 4, 5)
        y = y.reshape(bsz, -1, w * w, c)
        mask = attention_mask(hp, wp, w, s) if s else None
        y = WindowAttention(c, w, self.num_heads, self.qkv_bias, name="attn", **kw)(y, mask)
        y = y.reshape(bsz, hp // w, wp // w, w, w, c).transpose(0, 1, 3, 2, 4, 5)
        y = y.reshape(bsz, hp, wp, c)
        if s:
            y = jnp.roll(y, (s, s), axis=(1, 2))
        x = x + _drop_path(self, y, self.drop_path, train)
        hidden = int(c * self.mlp_ratio)
        y = Linear(hidden, name="fc1", **kw)(LayerNorm(name="norm2")(x))
        y = Linear(c, name="fc2", **kw)(gelu(y))
        return x + _drop_path(self, y, self.drop_path, train)


def _res_conv(resi_connection: str, dim: int, prefix: str, conv_kw: dict) -> Any:
    """SwinIR's conv before a residual: '1conv' (3x3) or '3conv'
    (3x3 dim->dim/4, LReLU 0.2, 1x1, LReLU 0.2, 3x3 dim/4->dim). Names `prefix`
    or `prefix_0/_2/_4` (torch's Sequential indices)."""
    if resi_connection == "1conv":
        return Conv(dim, 3, name=prefix, **conv_kw)
    if resi_connection == "3conv":
        c1 = Conv(dim // 4, 3, name=f"{prefix}_0", **conv_kw)
        c2 = Conv(dim // 4, 1, name=f"{prefix}_2", **conv_kw)
        c3 = Conv(dim, 3, name=f"{prefix}_4", **conv_kw)
        act = lambda t: jax.nn.leaky_relu(t, CONV3_SLOPE)
        return lambda t: c3(act(c2(act(c1(t)))))
    raise ValueError(f"resi_connection={resi_connection!r}, expected '1conv' or '3conv'")


class RSTB(nn.Module):
    """Residual Swin transformer block: x (B, Hp, Wp, C) -> conv(blocks(x)) + x.
    Block j is shifted by window_size // 2 when j is odd."""

    dim: int
    depth: int
    num_heads: int
    window_size: int
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    resi_connection: str = "1conv"
    drop_path: Sequence[float] = ()
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        kw = dict(runtime=self.runtime)
        y = x
        for j in range(self.depth):
            dp = self.drop_path[j] if self.drop_path else 0.0
            y = SwinBlock(self.dim, self.num_heads, self.window_size,
                          0 if j % 2 == 0 else self.window_size // 2, self.mlp_ratio,
                          self.qkv_bias, dp, name=f"blocks_{j}", **kw)(y, train)
        conv = _res_conv(self.resi_connection, self.dim, "conv", kw)
        return conv(y).astype(jnp.float32) + x


class SwinIREncoder(nn.Module):
    """SwinIR without upsampler: (B, H, W, 3) -> (B, H, W, num_feat) float32.

    Any H, W: the input is reflect-padded (bottom/right, as SwinIR's
    `check_image_size`) to multiples of window_size and the output cropped back.
    `train=True` applies stochastic depth (drop_path_rate, linearly increasing
    over all blocks as in SwinIR) and needs a 'dropout' rng.
    """

    embed_dim: int = 180
    depths: Sequence[int] = (6, 6, 6, 6, 6, 6)
    num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6)
    window_size: int = 8
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    patch_norm: bool = True
    resi_connection: str = "1conv"
    num_feat: int = 64
    drop_path_rate: float = 0.0
    runtime: RuntimeOptions = RuntimeOptions()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], runtime: RuntimeOptions = RuntimeOptions(),
                    **kwargs) -> "SwinIREncoder":
        """From a config sub-dict with SWINIR_DEFAULTS' keys (missing keys take
        the defaults; unknown keys are an error) and the execution options. kwargs go
        to the module (e.g. name)."""
        cfg = dict(cfg)
        unknown = sorted(set(cfg) - set(SWINIR_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown SwinIR config keys {unknown}; known: {sorted(SWINIR_DEFAULTS)}")
        c = {**SWINIR_DEFAULTS, **cfg}
        validate_swinir_config(c)
        return cls(embed_dim=int(c["embed_dim"]), depths=tuple(int(d) for d in c["depths"]),
                   num_heads=tuple(int(h) for h in c["num_heads"]),
                   window_size=int(c["window_size"]), mlp_ratio=float(c["mlp_ratio"]),
                   qkv_bias=bool(c["qkv_bias"]), patch_norm=bool(c["patch_norm"]),
                   resi_connection=str(c["resi_connection"]), num_feat=int(c["num_feat"]),
                   drop_path_rate=float(c["drop_path_rate"]), runtime=runtime, **kwargs)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        validate_swinir_config(dict(embed_dim=self.embed_dim, depths=self.depths,
                                    num_heads=self.num_heads, window_size=self.window_size,
                                    mlp_ratio=self.mlp_ratio, resi_connection=self.resi_connection,
                                    num_feat=self.num_feat, drop_path_rate=self.drop_path_rate))
        _, h, w, _ = x.shape
        ws = self.window_size
        # (h + ws - 1) // ws * ws - h: also for symbolic h, w (a multiple of ws by form)
        ph, pw = (h + ws - 1) // ws * ws - h, (w + ws - 1) // ws * ws - w
        x = _reflect_pad(x, ph, pw)
        conv_kw = dict(runtime=self.runtime)
        f = Conv(self.embed_dim, 3, name="conv_first", **conv_kw)(x).astype(jnp.float32)
        t = LayerNorm(name="patch_embed_norm")(f) if self.patch_norm else f
        total = sum(self.depths)
        dpr = np.linspace(0.0, self.drop_path_rate, total) if total > 1 else np.zeros(total)
        start = 0
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            rates = tuple(float(r) for r in dpr[start:start + depth])
            start += depth
            t = RSTB(self.embed_dim, depth, heads, ws, self.mlp_ratio, self.qkv_bias,
                     self.resi_connection, rates, name=f"layers_{i}", **conv_kw)(t, train)
        t = LayerNorm(name="norm")(t)
        body = _res_conv(self.resi_connection, self.embed_dim, "conv_after_body", conv_kw)
        y = body(t).astype(jnp.float32) + f
        y = Conv(self.num_feat, 3, name="conv_before_upsample_0", **conv_kw)(y)
        y = jax.nn.leaky_relu(y.astype(jnp.float32), OUT_SLOPE)
        return y[:, :h, :w]


def validate_swinir_config(c: Mapping[str, Any]) -> None:
    """Raise ValueError naming the field when a SwinIR config is inconsistent."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"invalid SwinIR config: {msg}")

    depths, heads = tuple(c["depths"]), tuple(c["num_heads"])
    need(len(depths) > 0 and all(int(d) > 0 for d in depths), f"depths={depths} must be positive")
    need(len(heads) == len(depths), f"num_heads={heads} needs one entry per stage (depths={depths})")
    need(all(int(h) > 0 and c["embed_dim"] % int(h) == 0 for h in heads),
         f"embed_dim={c['embed_dim']} must be divisible by every num_heads={heads}")
    need(int(c["window_size"]) >= 2, f"window_size={c['window_size']} must be >= 2")
    need(float(c["mlp_ratio"]) > 0, f"mlp_ratio={c['mlp_ratio']} must be > 0")
    need(c["resi_connection"] in ("1conv", "3conv"),
         f"resi_connection={c['resi_connection']!r}, expected '1conv' or '3conv'")
    need(int(c["num_feat"]) > 0, f"num_feat={c['num_feat']} must be positive")
    need(0.0 <= float(c["drop_path_rate"]) < 1.0,
         f"drop_path_rate={c['drop_path_rate']} must be in [0, 1)")
