"""An independent PyTorch SwinIR feature encoder (no upsampler), for parity tests.

Written from the SwinIR paper's definition, not from an implementation. The
windowed attention is computed as *global* attention over all tokens of the
(cyclically shifted) map with an additive (L, L) mask: -inf between tokens of
different windows, SwinIR's -100 between tokens of one window that came from
different regions of the unshifted map, else 0 plus the relative position bias
of their in-window offset. That equals per-window attention (exp(-inf) = 0)
without partitioning anything, so it checks the window partition, the
shifted-window mask and the bias indexing of the JAX code independently.

Module names give the LTE/SwinIR state-dict layout (conv_first, patch_embed.norm,
layers.i.residual_group.blocks.j.attn.qkv, ...), buffers included, so tests also
exercise `msit_jax.io.swinir_import`. Only tests import this (PyTorch is optional).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def region_ids(n: int, window: int, shift: int) -> torch.Tensor:
    """Region (0, 1, 2) along one axis of each position of the shifted frame:
    position p holds the unshifted pixel (p + shift) mod n; the last `window`
    positions split at n - shift into the wrapped-around part and the rest."""
    p = torch.arange(n)
    if shift == 0:
        return torch.zeros(n, dtype=torch.long)
    return torch.where(p < n - window, 0, torch.where(p < n - shift, 1, 2))


def global_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """(L, L) additive mask over the h*w tokens of the shifted frame (row-major)."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    win = (ys // window) * (w // window) + xs // window
    reg = region_ids(h, window, shift)[ys] * 3 + region_ids(w, window, shift)[xs]
    same_win = win[:, None] == win[None, :]
    same_reg = reg[:, None] == reg[None, :]
    mask = torch.full((h * w, h * w), float("-inf"))
    mask[same_win] = -100.0
    mask[same_win & same_reg] = 0.0
    return mask


def offset_index(h: int, w: int, window: int) -> torch.Tensor:
    """(L, L) bias-table row of each token pair (meaningful within a window):
    (dy + window - 1) * (2 window - 1) + dx + window - 1, dy/dx in-window offsets."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    iy, ix = (ys % window).reshape(-1), (xs % window).reshape(-1)
    dy = iy[:, None] - iy[None, :] + window - 1
    dx = ix[:, None] - ix[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def window_index_buffer(window: int) -> torch.Tensor:
    """SwinIR's relative_position_index buffer: offset_index of one window."""
    return offset_index(window, window, window)


def square_mask_buffer(img_size: int, window: int) -> torch.Tensor:
    """SwinIR's attn_mask buffer for an img_size x img_size map: (nW, N, N),
    the within-window blocks of the global mask, windows row-major."""
    g = global_window_mask(img_size, img_size, window, window // 2)
    grid = torch.arange(img_size * img_size).view(img_size, img_size)
    blocks = []
    for wy in range(0, img_size, window):
        for wx in range(0, img_size, window):
            idx = grid[wy:wy + window, wx:wx + window].reshape(-1)
            blocks.append(g[idx][:, idx])
    return torch.stack(blocks)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", window_index_buffer(window))

    def forward(self, x: torch.Tensor, h: int, w: int, shift: int) -> torch.Tensor:
        """x (B, L, C) tokens of the shifted h x w frame -> (B, L, C)."""
        b, n, c = x.shape
        hd = c // self.heads
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, hd).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, L, hd)
        logits = torch.matmul(q, k.transpose(-1, -2)) / (hd ** 0.5)
        bias = self.relative_position_bias_table[offset_index(h, w, self.window)]  # (L, L, heads)
        logits = logits + bias.permute(2, 0, 1) + global_window_mask(h, w, self.window, shift)
        out = torch.matmul(torch.softmax(logits, -1), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, window, shift, mlp_ratio, img_size):
        super().__init__()
        self.shift = shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shift:
            self.register_buffer("attn_mask", square_mask_buffer(img_size, window))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, L, C)
        y = self.norm1(t).transpose(1, 2).reshape(b, c, h, w)
        y = torch.roll(y, (-self.shift, -self.shift), (2, 3))
        y = self.attn(y.flatten(2).transpose(1, 2), h, w, self.shift)
        y = torch.roll(y.transpose(1, 2).reshape(b, c, h, w), (self.shift, self.shift), (2, 3))
        t = t + y.flatten(2).transpose(1, 2)
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


def res_conv(kind: str, dim: int) -> nn.Module:
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, padding=1)
    return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, padding=1), nn.LeakyReLU(0.2),
                         nn.Conv2d(dim // 4, dim // 4, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(dim // 4, dim, 3, padding=1))


class Group(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


class Stage(nn.Module):
    def __init__(self, dim, depth, heads, window, mlp_ratio, resi_connection, img_size):
        super().__init__()
        self.residual_group = Group([Block(dim, heads, window, (j % 2) * (window // 2),
                                           mlp_ratio, img_size) for j in range(depth)])
        self.conv = res_conv(resi_connection, dim)

    def forward(self, x):
        return self.conv(self.residual_group(x)) + x


class PatchNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)


def channel_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TorchSwinIR(nn.Module):
    """(B, 3, H, W) -> (B, num_feat, H, W): reflect-pad to the window, run, crop."""

    def __init__(self, embed_dim=180, depths=(6,) * 6, num_heads=(6,) * 6, window_size=8,
                 mlp_ratio=2.0, resi_connection="1conv", num_feat=64, img_size=48):
        super().__init__()
        self.window = window_size
        self.conv_first = nn.Conv2d(3, embed_dim, 3, padding=1)
        self.patch_embed = PatchNorm(embed_dim)
        self.layers = nn.ModuleList([
            Stage(embed_dim, d, h, window_size, mlp_ratio, resi_connection, img_size)
            for d, h in zip(depths, num_heads)])
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = res_conv(resi_connection, embed_dim)
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, padding=1),
                                                  nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % self.window, 0, -h % self.window), mode="reflect")
        f = self.conv_first(x)
        t = channel_norm(self.patch_embed.norm, f)
        for stage in self.layers:
            t = stage(t)
        y = self.conv_after_body(channel_norm(self.norm, t)) + f
        return self.conv_before_upsample(y)[..., :h, :w]


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters of a test-friendly scale (LayerNorm weights near 1,
    Linear/conv weights ~ 1/sqrt(fan_in), biases and bias tables ~ 0.1-0.5)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if name.endswith("relative_position_bias_table"):
            p.copy_(0.5 * r)
        elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * r)
        elif p.ndim == 1:
            p.copy_(0.1 * r)
        else:
            p.copy_(r / (p[0].numel() ** 0.5))
    return model
