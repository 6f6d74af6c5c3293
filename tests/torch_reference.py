"""An independent PyTorch implementation of MSIT (from docs/design.md), for parity tests.

Module attribute names follow the official release so its state_dict has the
official keys; the decoder uses `F.grid_sample` exactly as docs/design.md#2-model-semantics
describes. Only tests import this (PyTorch is an optional dependency).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def torch_coord_axis(n: int) -> torch.Tensor:
    r = 1.0 / n
    return (-1 + r) + (2 * r) * torch.arange(n).float()


def torch_make_coord(h: int, w: int) -> torch.Tensor:
    """(h, w, 2) pixel-centre grid, (row, col)."""
    return torch.stack(torch.meshgrid(torch_coord_axis(h), torch_coord_axis(w), indexing="ij"), -1)


class RIM(nn.Module):
    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.shape = (cout, cin, k, k)
        self.register_buffer("weight", torch.randn(*self.shape) / math.sqrt(cin * k * k))
        n = cout * cin
        self.convmap = nn.Conv2d(n, n, 3, padding=1, groups=n, bias=False)
        self.linear = nn.Conv2d(n, n, 1, groups=n, bias=False)
        self.bias = nn.Parameter(0.1 * torch.randn(cout))
        self.k = k

    def kernel(self) -> torch.Tensor:
        w = self.weight.view(1, -1, self.k, self.k)
        return self.weight + (self.convmap(w) * self.linear(w)).view(*self.shape)

    def forward(self, x):
        return F.conv2d(x, self.kernel(), self.bias, padding=self.k // 2)


def scale_conv(kind: str, cin: int, cout: int, k: int) -> nn.Module:
    return RIM(cin, cout, k) if kind == "rim" else nn.Conv2d(cin, cout, k, padding=k // 2)


class LEM(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        m = torch.zeros(dim, 1, 3, 3)
        m[0::4, 0, 1, 2] = 1
        m[1::4, 0, 1, 0] = 1
        m[2::4, 0, 2, 1] = 1
        m[3::4, 0, 0, 1] = 1
        m[4::8, 0, 0, 2] = 1
        m[5::8, 0, 2, 0] = 1
        m[6::8, 0, 2, 2] = 1
        m[7::8, 0, 0, 0] = 1
        self.mask = nn.Parameter(m, requires_grad=False)
        self.mix_margin = nn.Parameter(torch.tensor(1.0))
        self.dim = dim

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), self.mask, groups=self.dim)


class MSNO(nn.Module):
    def __init__(self, dim, heads, conv, use_lem):
        super().__init__()
        self.v = nn.Conv2d(dim, dim, 1, bias=False)
        self.s = nn.Conv2d(dim, dim, 1, bias=False)
        self.lem = LEM(dim)
        self.heads, self.use_lem = heads, use_lem
        for i in range(heads):
            setattr(self, f"Ms_conv_{i + 1}", scale_conv(conv, dim // heads, dim // heads, 3 + 2 * i))
        self.sim0 = nn.Conv2d(dim, 2 * dim, 1, groups=heads)
        self.bn = nn.BatchNorm2d(2 * dim)
        self.sim1 = nn.Conv2d(2 * dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        v, s = self.v(x), self.s(x)
        if self.use_lem:
            s = self.lem(s)
        parts = s.chunk(self.heads, 1)
        s = torch.cat([getattr(self, f"Ms_conv_{i + 1}")(p) for i, p in enumerate(parts)], 1)
        s = self.sim1(F.gelu(self.bn(self.sim0(s))))
        return self.proj(s * v)


class MsC(nn.Module):
    def __init__(self, dim, heads, conv):
        super().__init__()
        self.heads = heads
        self.proj0 = nn.Conv2d(dim, dim, 1)
        for i in range(heads):
            setattr(self, f"local_conv_{i + 1}", scale_conv(conv, dim // heads, dim // heads, 3 + 2 * i))
        self.proj1 = nn.Conv2d(dim, 2 * dim, 1, groups=dim // heads)
        self.bn = nn.BatchNorm2d(2 * dim)
        self.proj2 = nn.Conv2d(2 * dim, dim, 1)

    def forward(self, x):
        parts = self.proj0(x).chunk(self.heads, 1)
        y = torch.cat([getattr(self, f"local_conv_{i + 1}")(p) for i, p in enumerate(parts)], 1)
        return self.proj2(F.gelu(self.bn(self.proj1(y))))


class ResBlock(nn.Module):
    def __init__(self, c, res_scale=1.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.res_scale = res_scale

    def forward(self, x):
        return x + self.body(x) * self.res_scale


class MeanShift(nn.Conv2d):
    def __init__(self, sign):
        super().__init__(3, 3, 1)
        self.weight.data = torch.eye(3).view(3, 3, 1, 1)
        self.bias.data = sign * torch.tensor([0.4488, 0.4371, 0.4040])


class EDSR(nn.Module):
    """EDSR (Lim et al. 2017) without its upsampler: head conv, residual blocks (conv,
    ReLU, conv, scaled by res_scale, plus the input), a conv, a global skip."""

    def __init__(self, n_res, c, res_scale=1.0):
        super().__init__()
        self.sub_mean, self.add_mean = MeanShift(-1), MeanShift(1)  # unused, as upstream
        self.head = nn.Sequential(nn.Conv2d(3, c, 3, padding=1))
        self.body = nn.Sequential(*[ResBlock(c, res_scale) for _ in range(n_res)],
                                  nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        h = self.head(x)
        return self.body(h) + h


class ChannelAttention(nn.Module):
    """RCAN's CA (Zhang et al. 2018): global average pool, 1x1 squeeze (c // r) + ReLU,
    1x1 excite + sigmoid, rescale the channels."""

    def __init__(self, c, r):
        super().__init__()
        self.conv_du = nn.Sequential(nn.Conv2d(c, c // r, 1), nn.ReLU(), nn.Conv2d(c // r, c, 1),
                                     nn.Sigmoid())

    def forward(self, x):
        return x * self.conv_du(x.mean(dim=(2, 3), keepdim=True))


class RCAB(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), ChannelAttention(c, r))

    def forward(self, x):
        return x + self.body(x)


class ResGroup(nn.Module):
    def __init__(self, c, r, n_blocks):
        super().__init__()
        self.body = nn.Sequential(*[RCAB(c, r) for _ in range(n_blocks)],
                                  nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class RCAN(nn.Module):
    """RCAN without its upsampler: head conv, residual groups of RCABs (each group ends
    with a conv and a skip), a conv, a global skip."""

    def __init__(self, n_groups, n_blocks, c, r):
        super().__init__()
        self.sub_mean, self.add_mean = MeanShift(-1), MeanShift(1)  # unused, as upstream
        self.head = nn.Sequential(nn.Conv2d(3, c, 3, padding=1))
        self.body = nn.Sequential(*[ResGroup(c, r, n_blocks) for _ in range(n_groups)],
                                  nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        h = self.head(x)
        return self.body(h) + h


class RDBConv(nn.Module):
    def __init__(self, cin, g, k):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, g, k, padding=k // 2), nn.ReLU())

    def forward(self, x):
        return torch.cat([x, self.conv(x)], 1)


class RDB(nn.Module):
    def __init__(self, g0, g, c, k):
        super().__init__()
        self.convs = nn.Sequential(*[RDBConv(g0 + i * g, g, k) for i in range(c)])
        self.LFF = nn.Conv2d(g0 + c * g, g0, 1)

    def forward(self, x):
        return self.LFF(self.convs(x)) + x


class RDN(nn.Module):
    def __init__(self, g0, k, d, c, g):
        super().__init__()
        self.SFENet1 = nn.Conv2d(3, g0, k, padding=k // 2)
        self.SFENet2 = nn.Conv2d(g0, g0, k, padding=k // 2)
        self.RDBs = nn.ModuleList([RDB(g0, g, c, k) for _ in range(d)])
        self.GFF = nn.Sequential(nn.Conv2d(d * g0, g0, 1), nn.Conv2d(g0, g0, k, padding=k // 2))

    def forward(self, x):
        f1 = self.SFENet1(x)
        y = self.SFENet2(f1)
        outs = []
        for blk in self.RDBs:
            y = blk(y)
            outs.append(y)
        return self.GFF(torch.cat(outs, 1)) + f1


class PosBias(nn.Module):
    def __init__(self, scale, dims, heads):
        super().__init__()
        self.proj = nn.Linear(dims, heads)
        self.b = 2.0 ** torch.linspace(0, scale, dims // 4) - 1

    def forward(self, rel):  # (..., 2) -> (..., heads)
        ang = rel[..., :, None] * self.b  # (..., 2, F)
        enc = torch.cat([torch.sin(ang).flatten(-2), torch.cos(ang).flatten(-2)], -1)
        return self.proj(enc)


class MLP(nn.Module):
    def __init__(self, din, hidden):
        super().__init__()
        layers, last = [], din
        for h in hidden:
            layers += [nn.Linear(last, h), nn.GELU()]
            last = h
        layers.append(nn.Linear(last, 3))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def grid(img, coord, mode, padding="zeros"):
    """Sample img (B, C, H, W) at coord (B, N, 2) (row, col) -> (B, N, C)."""
    out = F.grid_sample(img, coord.flip(-1)[:, :, None], mode=mode, padding_mode=padding,
                        align_corners=False)
    return out[..., 0].permute(0, 2, 1)


class TorchMSIT(nn.Module):
    """Full model from a msit_jax model config (attribute names = official keys)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.encoder in ("edsr-baseline", "edsr"):
            self.encoder = EDSR(cfg.edsr.n_resblocks, cfg.edsr.n_feats, cfg.edsr.res_scale)
            cin = cfg.edsr.n_feats
        elif cfg.encoder == "rcan":
            r = cfg.rcan
            self.encoder = RCAN(r.n_resgroups, r.n_resblocks, r.n_feats, r.reduction)
            cin = r.n_feats
        else:
            r = cfg.rdn
            self.encoder = RDN(r.g0, r.kernel_size, r.n_blocks, r.n_layers, r.growth)
            cin = r.g0
        d = cfg.dim
        self.conv_ch = nn.Conv2d(cin, d, 1)
        self.amsno = MSNO(d, cfg.msno_heads, cfg.conv, cfg.use_lem)
        self.conv_vs = nn.ModuleList([scale_conv(cfg.conv, d, d, 3)])
        self.multi_conv_qs = nn.ModuleList([MsC(d, cfg.qk_heads, cfg.conv)])
        self.pb_encoder = PosBias(cfg.posenc_scale, cfg.posenc_dims, cfg.heads)
        n = (2 * cfg.radius + 1) ** 2
        self.imnets = nn.ModuleList([MLP(d * n + 2, cfg.mlp_hidden)])

    def encode(self, inp):
        feat = self.amsno(self.conv_ch(self.encoder(inp)))
        return self.multi_conv_qs[0](feat), self.conv_vs[0](feat)

    def forward(self, inp, coord, cell):
        """inp (B, 3, H, W) normalised; coord (B, N, 2); cell (B, 2) -> (B, N, 3)."""
        cfg = self.cfg
        feat_q, feat_v = self.encode(inp)
        b, d, h, w = feat_q.shape
        r, heads = cfg.radius, cfg.heads
        lr_coord = torch_make_coord(h, w).permute(2, 0, 1)[None].expand(b, 2, h, w)
        c_q = grid(lr_coord, coord, "nearest")  # (B, N, 2)
        dh = torch.linspace(-r, r, 2 * r + 1) * (2 / h)
        dw = torch.linspace(-r, r, 2 * r + 1) * (2 / w)
        delta = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), -1).view(1, 1, -1, 2)
        keys = c_q[:, :, None] + delta  # (B, N, K, 2)
        nq, nk = coord.shape[1], keys.shape[2]
        q = grid(feat_q, coord, "bilinear").reshape(b, nq, heads, d // heads)
        k = grid(feat_q, keys.reshape(b, -1, 2), "nearest").reshape(b, nq, nk, heads, d // heads)
        v = grid(feat_v, keys.reshape(b, -1, 2), "nearest").reshape(b, nq, nk, heads, d // heads)
        rel = coord[:, :, None] - keys
        rel = rel * torch.tensor([h, w], dtype=torch.float32)
        logits = torch.einsum("bqhc,bqkhc->bqkh", q, k) / math.sqrt(d // heads)
        attn = torch.softmax(logits + self.pb_encoder(rel), dim=2)
        x = (v * attn[..., None]).reshape(b, nq, -1)
        rel_cell = cell * torch.tensor([h, w], dtype=torch.float32)
        x = torch.cat([x, rel_cell[:, None].expand(b, nq, 2)], -1)
        return self.imnets[0](x) + grid(inp, coord, "bilinear", "border")


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics/affine and biases, so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            elif name.endswith("bn.weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("bn.bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model
