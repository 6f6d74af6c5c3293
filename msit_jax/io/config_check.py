"""Check a model config read from a file against the tensors stored with it, before
anything is built from it.

A model config that comes with weights (a model folder's model_config.json, a
safetensors file's metadata, an official .pth's `args`) is untrusted: building a
Flax module, tracing `init`/`eval_shape` or allocating arrays for it costs what the
config asks for, not what the file holds (`edsr.n_resblocks=100000` traces for
minutes; `radius=10000`, `mlp_hidden=(10**9,)` or `dim=10**6` ask for terabytes).
So every loader first compares the config with what the file's header or metadata
says about its tensors (names, shapes, dtypes; nothing restored or allocated):

    problems = config_check.mismatches(model_cfg, tensors)
    config_check.check(model_cfg, tensors, where=path)   # CheckpointError naming path

Every config field that sets a variable's count or size is compared, by integer
arithmetic on the stored shapes, with the value the tensors imply: the number of
residual / dense blocks, residual groups, layers and kernel-size heads with the
number of block tensors present, `dim` and the encoder widths (and RCAN's
channel-attention width n_feats // reduction) with the widths of the stored
kernels (each encoder's own comparison is its `EncoderSpec.bound`; SwinIR's stages,
blocks, heads, window and MLP width from its block tensors), `mlp_hidden` with the decoder's stored Linear layers, `radius` (with
`dim` and `use_cell`) with the decoder's stored input width, `heads` and
`posenc_dims` with the positional-bias Linear, `conv` and `batch_norm` with the
presence of RIM and BatchNorm tensors. Once they all agree, the config's model is
no larger than the file's tensors, so the exact comparison that follows
(`torch_io.state_dict_to_variables`, `model_dir.check_variables`: every key and
shape, via `jax.eval_shape`) is cheap.

Tensors are named in the official (PyTorch) layout; `official_names` maps a Flax
variable tree (or Orbax checkpoint metadata) onto it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import ml_collections

from msit_jax.errors import CheckpointError, one_line
from msit_jax.io.torch_io import flax_to_torch_key, torch_shape, variable_kind
from msit_jax.models.encoders import ENCODERS, Bounds, stored_family

# How many mismatching fields a message lists.
MAX_REPORTED = 3
_FLOAT_CODES = {"F16", "BF16", "F32", "F64"}  # safetensors dtype codes
_INT_CODES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}


class Tensor(NamedTuple):
    """What a file says about one stored tensor: shape in the official (torch) layout,
    dtype kind ('float', 'int', 'bool' or the dtype's name), and how to name it in a
    message (its name and shape as stored)."""

    shape: tuple[int, ...]
    dtype: str
    label: str


def dtype_kind(dtype: Any) -> str:
    """'float', 'int' or 'bool' for a numpy / ml_dtypes / torch dtype or a safetensors
    dtype code; otherwise the dtype's name."""
    name = str(dtype)
    name = name[len("torch."):] if name.startswith("torch.") else name
    if name in _FLOAT_CODES or re.fullmatch(r"b?float\d*(_\w+)?|half|double", name):
        return "float"
    if name in _INT_CODES or re.fullmatch(r"u?int\d*|long|short", name):
        return "int"
    if name in ("BOOL", "bool"):
        return "bool"
    return name


def tensor(name: str, shape: Iterable[int], dtype: Any) -> Tensor:
    shape = tuple(int(d) for d in shape)
    return Tensor(shape, dtype_kind(dtype), f"{name} {shape}")


def tensors_of(arrays: Mapping[str, Any]) -> dict[str, Tensor]:
    """Official-layout arrays (numpy, torch, anything with .shape and .dtype) ->
    {name: Tensor}; shapes only, no data read."""
    return {k: tensor(k, getattr(v, "shape", ()), getattr(v, "dtype", type(v).__name__))
            for k, v in arrays.items()}


def _leaves(tree: Any, prefix: tuple = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    if hasattr(tree, "items") and not hasattr(tree, "shape"):
        for k, v in tree.items():
            yield from _leaves(v, prefix + (str(k),))
    else:
        yield prefix, tree


def official_names(tree: Mapping[str, Any]) -> dict[str, Tensor]:
    """A Flax variable tree {'params', 'frozen', 'batch_stats'} of arrays, shape structs
    or Orbax ArrayMetadata -> {official name: Tensor} (shapes in the official layout;
    a path with no official name keeps its Flax path)."""
    out = {}
    for path, leaf in _leaves(tree):
        if leaf is None:  # an empty collection, as some metadata trees write it
            continue
        shape = tuple(int(d) for d in getattr(leaf, "shape", ()) or ())
        dtype = getattr(leaf, "dtype", type(leaf).__name__)
        flax_name = "/".join(path)
        try:
            collection, *rest = path
            key = flax_to_torch_key(collection, tuple(rest))
            tshape = torch_shape(variable_kind(collection, rest[-1], len(shape)), shape)
        except (KeyError, IndexError, ValueError):
            key, tshape = flax_name, shape
        out[key] = Tensor(tuple(tshape), dtype_kind(dtype), f"{flax_name} {shape}")
    return out


def _short(value: Any, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters (a hostile tuple may have a million items)."""
    if isinstance(value, (tuple, list)) and len(value) > 8:
        text = "(" + ", ".join(repr(v) for v in value[:4]) + f", ... {len(value)} items)"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _count(tensors: Mapping[str, Tensor], fmt: str, start: int = 0) -> int:
    """How many consecutive indices i = start, start+1, ... have a tensor fmt.format(i)."""
    n = 0
    while fmt.format(start + n) in tensors:
        n += 1
    return n


def mismatches(model_cfg: ml_collections.ConfigDict, tensors: Mapping[str, Tensor]
               ) -> list[str]:
    """The config fields that disagree with the stored tensors, each as
    'field=value: what the tensors hold (evidence)', in model order; [] when every
    field that sets a variable's count or size matches. Integer arithmetic on names
    and shapes only: nothing is built or allocated, whatever the config says."""
    c = model_cfg
    out: list[str] = []

    def shape(key: str, ndim: int) -> Optional[tuple[int, ...]]:
        t = tensors.get(key)
        return t.shape if t is not None and len(t.shape) == ndim else None

    def label(key: str) -> str:
        t = tensors.get(key)
        return t.label if t is not None else f"no {key}"

    def compare(field: str, want: Any, got: Optional[int], held: str,
                key: Optional[str] = None) -> bool:
        """Record a mismatch unless `got` (from the tensor `key`, or a count when key is
        None) is `want`; held: what the tensors hold, '{}' for `got`."""
        if got is None:
            out.append(f"{field}={_short(want)}: the tensors hold no {key} (or not of "
                       "the expected rank), so nothing bounds it")
            return False
        if got != want:
            out.append(f"{field}={_short(want)}: the tensors hold {held.format(got)}"
                       + (f" ({label(key)})" if key else ""))
            return False
        return True

    def dim_of(key: str, axis: int = 0, ndim: int = 4) -> Optional[int]:
        s = shape(key, ndim)
        return s[axis] if s is not None else None

    # ---- encoder: its layout family from the names, its sizes from the registry's bound
    family = stored_family(tensors)
    spec = ENCODERS.get(c.encoder) if isinstance(c.encoder, str) else None
    if spec is None or spec.family != family:
        names = [repr(n) for n, s in ENCODERS.items() if s.family == family]
        out.append(f"encoder={_short(c.encoder)}: the tensors hold "
                   + (f"an {' / '.join(names)} encoder" if family else
                      "no encoder (none of encoder.head.0.weight, encoder.SFENet1.weight, "
                      "encoder.layers.0.residual_group.blocks.0.attn."
                      "relative_position_bias_table)"))
    else:
        spec.bound(c[spec.sub_config], Bounds(compare, lambda fmt, start=0: _count(
            tensors, fmt, start), dim_of, out.append, label))

    # ---- feature width, layer kinds
    dim_ok = compare("dim", c.dim, dim_of("conv_ch.weight"), "width {}", "conv_ch.weight")
    stored_conv = "rim" if any(k.endswith(".convmap.weight") for k in tensors) else "plain"
    if c.conv != stored_conv:
        out.append(f"conv={c.conv!r}: the tensors are the {stored_conv!r} layout ("
                   + ("with" if stored_conv == "rim" else "no") + " *.convmap.weight)")
    stored_bn = "amsno.bn.weight" in tensors or "amsno.bn.running_mean" in tensors
    if bool(c.batch_norm) != stored_bn:
        out.append(f"batch_norm={c.batch_norm!r}: the tensors hold "
                   + ("BatchNorm layers (amsno.bn.*)" if stored_bn else "no BatchNorm layer "
                      "(no amsno.bn.weight)"))

    # ---- kernel-size heads
    compare("msno_heads", c.msno_heads, _count(tensors, "amsno.Ms_conv_{}.bias", 1),
            "{} MSNO convs (amsno.Ms_conv_N)")
    compare("qk_heads", c.qk_heads, _count(tensors, "multi_conv_qs.0.local_conv_{}.bias", 1),
            "{} Q/K convs (multi_conv_qs.0.local_conv_N)")

    # ---- decoder: positional bias, MLP, neighbourhood
    pb = "pb_encoder.proj.weight"
    compare("heads", c.heads, dim_of(pb, 0, 2), "{} attention heads", pb)
    compare("posenc_dims", c.posenc_dims, dim_of(pb, 1, 2), "encoding width {}", pb)
    n_linear = 0
    while f"imnets.0.layers.{2 * n_linear}.weight" in tensors:
        n_linear += 1
    widths = [dim_of(f"imnets.0.layers.{2 * i}.weight", 0, 2) for i in range(n_linear)]
    hidden = tuple(c.mlp_hidden)
    if n_linear == 0 or None in widths or tuple(widths[:-1]) != hidden:
        held = (f"hidden widths {tuple(widths[:-1])}" if n_linear and None not in widths
                else "no decoder MLP of 2-D Linear weights")
        out.append(f"mlp_hidden={_short(hidden)}: the tensors hold {held} "
                   "(imnets.0.layers.N.weight)")
    first = "imnets.0.layers.0.weight"
    fan_in = dim_of(first, 1, 2)
    if dim_ok and isinstance(c.radius, int) and c.radius >= 0:
        cell = 2 if c.use_cell else 0
        want = (2 * c.radius + 1) ** 2 * c.dim + cell
        if fan_in is None:
            out.append(f"radius={_short(c.radius)}: the tensors hold no {first}, so nothing "
                       "bounds it")
        elif fan_in != want:
            other = 2 - cell
            implied = _radius_for(fan_in - cell, c.dim)
            if implied is None and _radius_for(fan_in - other, c.dim) is not None:
                out.append(f"use_cell={c.use_cell!r}: the decoder's input width {fan_in} "
                           f"({label(first)}) is radius "
                           f"{_radius_for(fan_in - other, c.dim)} with use_cell={not c.use_cell}")
            else:
                out.append(f"radius={_short(c.radius)}: needs the decoder input width "
                           f"(2r+1)^2 * dim{' + 2' if cell else ''} = {_short(want)}, the "
                           f"tensors hold {fan_in} ({label(first)})"
                           + (f", which is radius {implied}" if implied is not None else ""))

    # ---- no variable is empty (every size field is positive): a (10**9, 0, 1, 1)
    # tensor holds no bytes, so its widths would bound nothing
    empty = next((t for _, t in sorted(tensors.items()) if 0 in t.shape), None)
    if empty is not None:
        out.append(f"{empty.label} is empty: no MSIT tensor is, so its sizes bound nothing")

    # ---- dtypes: weights are floating point, BatchNorm counters and SwinIR's
    # relative_position_index buffers integers
    for key in sorted(tensors):
        t = tensors[key]
        want_kind = "int" if key.endswith(("num_batches_tracked", ".relative_position_index")) \
            else "float"
        if t.dtype != want_kind:
            out.append(f"{t.label} has dtype {t.dtype}, expected "
                       + ("an integer" if want_kind == "int" else "a floating-point")
                       + " tensor")
            break
    return out


def _radius_for(width: int, dim: int) -> Optional[int]:
    """r with (2r+1)^2 * dim == width, or None."""
    if dim <= 0 or width <= 0 or width % dim:
        return None
    n = width // dim
    side = math.isqrt(n)
    return (side - 1) // 2 if side * side == n and side % 2 == 1 else None


def check(model_cfg: ml_collections.ConfigDict, tensors: Mapping[str, Tensor], where: str,
          what: str = "its model config") -> None:
    """CheckpointError naming `where` and the first mismatching fields unless the
    config's variable counts and sizes are those of `tensors` (see `mismatches`)."""
    problems = mismatches(model_cfg, tensors)
    if problems:
        more = len(problems) - MAX_REPORTED
        text = "; ".join(problems[:MAX_REPORTED]) + (f"; and {more} more" if more > 0 else "")
        raise CheckpointError(one_line(f"{where}: the tensors do not match {what}: {text}"),
                              path=where)
