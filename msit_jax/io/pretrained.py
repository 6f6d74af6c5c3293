"""Load MSIT weights: official `.pth` files or this project's checkpoints.

    model_cfg, variables = msit_jax.io.pretrained.load("epoch-best.pth")
    model_cfg, variables = msit_jax.io.pretrained.load("msit-lite")   # bundled weights

Accepted sources:
  * an official training checkpoint `{'model': {'name': 'amsit', 'args': ..., 'sd': ...}}`
    (architecture read from `args`; RIM or plain-conv layout detected from the keys);
  * a bare official state_dict `.pth` together with `model_cfg=`;
  * a `.safetensors` file (official parameter names, the model config in its
    metadata), or a model-hub folder holding `model.safetensors`
    (`python -m msit_jax.export SRC OUT --format safetensors` writes both);
  * this project's model checkpoint directory (`msit_jax.io.model_dir.save_model`)
    or a training workdir (its best, else latest, checkpoint; `msit_jax.io.workdir`);
  * the name of a model bundled with the package (`msit_jax.weights`, e.g.
    "msit-lite"), used when no file or folder of that name exists: a real path
    always wins.

A model config read from a file is untrusted: before any model is built or any
array allocated for it, it is checked against the tensors the file holds (the
safetensors header, the Orbax metadata of a checkpoint directory, the .pth state
dict; `msit_jax.io.config_check`). A config asking for more blocks, wider layers or
a larger neighbourhood than the tensors hold is a CheckpointError (exit 5) naming the
file and the first mismatching fields.

PyTorch is needed only for `.pth` files (`pip install "msit-jax[torch]"`);
safetensors files are read with numpy (`read_safetensors`): no extra package.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Mapping, NamedTuple, Optional

import ml_collections
import ml_dtypes
import numpy as np

from msit_jax import console, weights
from msit_jax.errors import CheckpointError, one_line
from msit_jax.io import config_check, model_dir
from msit_jax.io.torch_io import (StateDictError, detect_conv_kind, state_dict_to_variables,
                                 strip_prefix)
from msit_jax.io.workdir import is_training_workdir, load_workdir_model
from msit_jax.models.config import model_config, validate_model_config
from msit_jax.models.encoders import ENCODERS


def import_torch():
    """The torch module, or an ImportError naming the torch extra."""
    try:  # an optional dependency, imported when a .pth is read or written
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading PyTorch .pth checkpoints needs PyTorch, an optional dependency: "
            f"{console.install_hint('torch')}") from e
    return torch


def read_pth(path: str) -> Any:
    """torch.load a .pth on CPU, tensors only (no arbitrary pickled code).

    CheckpointError (one line naming the file and the reason) when the file is
    empty, not a PyTorch checkpoint, truncated, or holds non-tensor objects.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})", path=path) from e
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a PyTorch checkpoint",
                              path=path)
    # torch.save writes a zip archive (PK..); older files are a bare pickle (0x80 + protocol).
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a "
                              f"pickle; it starts with {head!r})", path=path)
    torch = import_torch()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notices
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the file
        msg = str(e)
        if "Weights only load failed" in msg:
            detail = next((ln.strip() for ln in msg.splitlines()
                           if ln.strip() and "WeightsUnpickler error" not in ln
                           and "Weights only" not in ln and "Please file" not in ln
                           and "Check the documentation" not in ln), "")
            reason = ("it holds objects other than tensors, which are not unpickled "
                      f"(weights_only=True){': ' + detail if detail else ''}")
        elif "central directory" in msg or "zip archive" in msg or isinstance(e, EOFError):
            reason = "truncated or corrupt (its zip archive is incomplete)"
        else:
            reason = f"{type(e).__name__}: {one_line(msg, 200)}"
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint: {reason}",
                              path=path) from e


def official_state_dict(obj: Any, path: str) -> Mapping[str, Any]:
    """The state_dict inside what `read_pth` returned (training checkpoint or bare)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and "sd" in obj["model"]:
        return obj["model"]["sd"]
    if isinstance(obj, Mapping) and obj and all(hasattr(v, "detach") for v in obj.values()):
        return obj
    kind = type(obj).__name__ if not isinstance(obj, Mapping) or obj else "an empty dict"
    raise CheckpointError(f"{path}: holds {kind}, neither an official training checkpoint "
                          "({'model': {'name', 'args', 'sd'}}) nor a state_dict of tensors",
                          path=path)


def _tensors_to_numpy(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        if not hasattr(v, "detach"):
            raise ValueError(f"state_dict entry {k!r} is not a tensor ({type(v).__name__})")
        out[k] = v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
    return out


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"unsupported official model args: {msg}")


def config_from_official_args(args: Mapping[str, Any], conv: str) -> ml_collections.ConfigDict:
    """Model config from an official checkpoint's `model.args` (the training YAML's model.args)."""
    enc = args.get("encoder_spec") or {}
    enc_name, enc_args = enc.get("name"), dict(enc.get("args") or {})
    _require(isinstance(enc_name, str) and enc_name in ENCODERS,
             f"encoder {enc_name!r} (supported: {', '.join(map(repr, ENCODERS))})")
    _require(enc_args.get("no_upsampling", False), "encoder must have no_upsampling=True")
    cfg = model_config(enc_name, conv)
    spec = ENCODERS[enc_name]
    try:
        cfg[spec.sub_config].update(spec.from_official(enc_args))
    except ValueError as e:
        _require(False, str(e))

    _require(args.get("imnet_num", 1) == 1 and args.get("conv_num", 1) == 1,
             "cascaded stages (imnet_num / conv_num != 1) are not used by any released config")
    _require(args.get("local_attn", True), "local_attn=False")
    cfg.dim = int(args.get("base_dim", 192))
    cfg.heads = int(args.get("head", 8))
    cfg.radius = int(args.get("r", 3))
    cfg.use_cell = bool(args.get("is_cell", True))
    cfg.use_lem = bool(args.get("use_lem", True))
    cfg.msno_heads = int(args.get("MsC_heads", 16))
    cfg.qk_heads = int(args.get("MsSA_q", 4))

    pb = args.get("pb_spec") or {}
    pb_args = pb.get("args") or {}
    _require(pb.get("name") == "posenc" and pb_args.get("posenc_type") == "sinusoid",
             f"positional bias {pb!r} (only the sinusoid 'posenc' is supported)")
    cfg.posenc_scale = float(pb_args.get("posenc_scale", 6))
    cfg.posenc_dims = int(pb_args.get("enc_dims", 256))

    im = args.get("imnet_spec") or {}
    im_args = im.get("args") or {}
    _require(im.get("name") == "mlp", f"imnet {im.get('name')!r}")
    _require(str(im_args.get("act", "relu")).lower() == "gelu", f"MLP act {im_args.get('act')!r}")
    _require(int(im_args.get("out_dim", 3)) == 3, "MLP out_dim must be 3")
    cfg.mlp_hidden = tuple(int(h) for h in im_args.get("hidden_list", ()))
    validate_model_config(cfg)
    return cfg


def official_args(model_cfg: ml_collections.ConfigDict) -> dict:
    """The official `model.args` (the training YAML's) describing `model_cfg`; the
    inverse of `config_from_official_args`. ValueError naming the field when the
    official code cannot build this architecture (e.g. an RDN that is no RDNconfig
    preset, a BatchNorm eps other than torch's default)."""
    validate_model_config(model_cfg)
    c = model_cfg

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"the official MSIT code cannot express this model: {msg}")

    need(c.bn_eps == 1e-5, f"bn_eps={c.bn_eps} (official BatchNorm2d uses 1e-5)")
    spec = ENCODERS[c.encoder]
    try:
        enc = {"name": spec.name, "args": spec.to_official(c[spec.sub_config])}
    except ValueError as e:
        need(False, str(e))
    return {
        "encoder_spec": enc,
        "base_dim": int(c.dim), "head": int(c.heads), "r": int(c.radius),
        "imnet_num": 1, "conv_num": 1, "is_cell": bool(c.use_cell), "local_attn": True,
        "use_lem": bool(c.use_lem), "MsC_heads": int(c.msno_heads), "MsSA_q": int(c.qk_heads),
        "pb_spec": {"name": "posenc", "args": {
            "posenc_type": "sinusoid", "posenc_scale": float(c.posenc_scale),
            "hidden_dims": 64, "enc_dims": int(c.posenc_dims), "gamma": 1}},
        "imnet_spec": {"name": "mlp", "args": {
            "out_dim": 3, "hidden_list": [int(h) for h in c.mlp_hidden], "act": "gelu"}},
    }


def _to_variables(sd: Mapping[str, np.ndarray], model_cfg: ml_collections.ConfigDict,
                  path: str) -> dict:
    """`state_dict_to_variables`, its StateDictError naming the file (one line)."""
    try:
        return state_dict_to_variables(sd, model_cfg)
    except StateDictError as e:
        raise StateDictError(f"{path}: {one_line(str(e))}", path=path) from None


def load_pth(path: str, model_cfg: Optional[ml_collections.ConfigDict] = None
             ) -> tuple[ml_collections.ConfigDict, dict]:
    """An official `.pth` (training checkpoint or bare state_dict) -> (model_cfg, variables)."""
    obj = read_pth(path)
    sd_obj = official_state_dict(obj, path)
    if sd_obj is not obj:  # an official training checkpoint
        spec = obj["model"]
        if spec.get("name") != "amsit":
            raise CheckpointError(f"{path}: model name {spec.get('name')!r} is not MSIT "
                                  "('amsit')", path=path)
        if not isinstance(spec["sd"], Mapping):
            raise CheckpointError(f"{path}: model.sd is a {type(spec['sd']).__name__}, not a "
                                  "state_dict", path=path)
        what = "the given model config" if model_cfg is not None else "its model args"
        try:
            sd = _tensors_to_numpy(strip_prefix(spec["sd"]))
            if model_cfg is None:
                model_cfg = config_from_official_args(spec.get("args") or {},
                                                      detect_conv_kind(sd))
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            raise CheckpointError(f"{path}: {one_line(str(e))}", path=path) from None
    else:
        what = "the given model config"
        sd = _tensors_to_numpy(obj)
        if model_cfg is None:
            raise ValueError(
                f"{path} is a bare state_dict: pass the model config, e.g. "
                f"load(path, model_config('edsr-baseline', conv='{detect_conv_kind(sd)}'))")
    validate_model_config(model_cfg)
    # Before anything is built for it: the config's sizes must be the tensors'.
    config_check.check(model_cfg, config_check.tensors_of(sd), path, what)
    variables = _to_variables(sd, model_cfg, path)
    for k, v in sd.items():
        if np.issubdtype(np.asarray(v).dtype, np.inexact) and not np.isfinite(v).all():
            raise CheckpointError(f"{path}: {k} holds non-finite values (NaN/inf): the weights "
                                  "are corrupt", path=path)
    return model_cfg, variables


# safetensors: the file and its metadata keys (metadata values are strings).
SAFETENSORS_FILE = "model.safetensors"
HUB_CONFIG_FILE = "config.json"
META_CONFIG = "msit_jax.model_config"  # this project's model config, JSON
META_ARGS = "msit.official_args"  # the official `model.args`, JSON (when expressible)


# safetensors dtype codes -> little-endian numpy dtypes (the format stores little-endian).
SAFETENSORS_DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"), "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
# A header larger than this is not a weights file (the format's own readers cap it at 100 MB).
SAFETENSORS_MAX_HEADER = 100 * 2 ** 20


class SafetensorsHeader(NamedTuple):
    """A .safetensors file's header: {name: (dtype code, shape, (begin, end))}, the
    metadata, and where the tensor data starts in the file."""

    entries: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]
    metadata: dict[str, str]
    data_start: int


def read_safetensors_header(path: str) -> SafetensorsHeader:
    """The header of a .safetensors file, validated, without reading the tensor data.

    The format (huggingface.co/docs/safetensors): an unsigned little-endian
    64-bit header size N, N bytes of JSON {name: {"dtype", "shape",
    "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the
    little-endian tensor bytes, offsets relative to the end of the header, which
    the tensors must tile exactly. CheckpointError (a ValueError; one line naming
    the file) for anything not a valid file.
    """
    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"could not read {path} as safetensors: {reason}", path=path)

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header size")
            n = int.from_bytes(head, "little")
            if n > min(SAFETENSORS_MAX_HEADER, size - 8):
                raise bad(f"header size {n} exceeds the file ({size} bytes)")
            text = f.read(n)
    except OSError as e:
        raise bad(e.strerror or str(e)) from e
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None) or {}
    if not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in meta.items())):
        raise bad("__metadata__ must map strings to strings")
    data_len = size - 8 - n
    entries, spans = {}, []
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"tensor {name!r}: {info!r} is not a tensor entry"
                      + (f" (unsupported dtype {info.get('dtype')!r})"
                         if isinstance(e, KeyError) and isinstance(info, dict)
                         and "dtype" in info else "")) from None
        # Python integers: a hostile shape cannot overflow the size computation.
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len \
                or end - begin != nbytes:
            raise bad(f"tensor {name!r}: offsets {[begin, end]} do not hold {info['dtype']} "
                      f"{list(shape)} ({nbytes} bytes) within the {data_len}-byte data")
        entries[name] = (info["dtype"], shape, (begin, end))
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise bad(f"tensor {name!r} starts at byte {begin}, expected {pos} (overlapping "
                      "or non-contiguous data)")
        pos = end
    if pos != data_len:
        raise bad(f"{data_len - pos} trailing bytes after the last tensor")
    return SafetensorsHeader(entries, dict(meta), 8 + n)


def safetensors_tensors(header: SafetensorsHeader) -> dict[str, config_check.Tensor]:
    """What a safetensors header says about its tensors, for `config_check`."""
    return {k: config_check.tensor(k, shape, code)
            for k, (code, shape, _) in header.entries.items()}


def read_safetensors(path: str, header: Optional[SafetensorsHeader] = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as numpy, metadata) of a .safetensors file, read with numpy alone
    (the `safetensors` package stays an export-only extra).

    The header is validated first (`read_safetensors_header`; pass `header` when it
    was already read). Every tensor is a fresh, writable array of its shape (0-d for
    shape []). CheckpointError (a ValueError; one line naming the file) for anything
    not a valid file.
    """
    header = header or read_safetensors_header(path)
    try:
        with open(path, "rb") as f:
            f.seek(header.data_start)
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"could not read {path} as safetensors: "
                              f"{e.strerror or e}", path=path) from e
    if len(data) != max((end for _, _, (_, end) in header.entries.values()), default=0):
        raise CheckpointError(f"could not read {path} as safetensors: it changed while "
                              "being read", path=path)
    buf = memoryview(data)
    tensors = {name: np.frombuffer(buf[begin:end], SAFETENSORS_DTYPES[code])
               .reshape(shape).copy()
               for name, (code, shape, (begin, end)) in header.entries.items()}
    return tensors, dict(header.metadata)


def load_safetensors(path: str, model_cfg: Optional[ml_collections.ConfigDict] = None
                     ) -> tuple[ml_collections.ConfigDict, dict]:
    """A .safetensors file (official names) -> (model_cfg, variables). The config
    comes from the metadata (`model_cfg=` overrides it). The config is checked
    against the tensors the header describes (`config_check`) before any tensor is
    read or any model built: CheckpointError naming the file and the fields."""
    header = read_safetensors_header(path)
    meta = header.metadata
    what = "the given model config"
    if model_cfg is None:
        if META_CONFIG not in meta and META_ARGS not in meta:
            raise ValueError(f"{path}: no model config in the safetensors metadata (keys "
                             f"{sorted(meta)}): pass one, e.g. load(path, model_config("
                             f"'edsr-baseline', conv='{detect_conv_kind(header.entries)}'))")
        try:
            if META_CONFIG in meta:
                what = f"the model config in its metadata ({META_CONFIG})"
                model_cfg = model_dir.config_from_json(meta[META_CONFIG])
            else:
                what = f"the official model args in its metadata ({META_ARGS})"
                model_cfg = config_from_official_args(json.loads(meta[META_ARGS]),
                                                      detect_conv_kind(header.entries))
            validate_model_config(model_cfg)
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            raise CheckpointError(f"{path}: {what}: {one_line(str(e))}", path=path) from None
    else:
        validate_model_config(model_cfg)
    config_check.check(model_cfg, safetensors_tensors(header), path, what)
    sd, _ = read_safetensors(path, header)
    return model_cfg, _to_variables(sd, model_cfg, path)


def resolve(path: str) -> str:
    """The file or folder `path` names: `path` itself when it exists, else the bundled
    model of that name (`msit_jax.weights`, e.g. 'msit-lite'). A real path always wins,
    so a folder called msit-lite in the working directory shadows the bundled model.

    FileNotFoundError (one line) when neither exists; for a bare name (no directory
    part, no extension) it lists the bundled models."""
    path = os.fspath(path)
    if os.path.exists(path):
        return path
    if weights.is_bundled(path):
        return weights.weights_path(path)
    if os.path.dirname(path) or os.path.splitext(path)[1]:
        raise FileNotFoundError(f"no checkpoint at {path}")
    raise weights.UnknownModelError(
        f"no checkpoint at {path}: no such file or folder, and not a bundled model "
        f"(bundled: {', '.join(weights.available())})")


def load(path: str, model_cfg: Optional[ml_collections.ConfigDict] = None
         ) -> tuple[ml_collections.ConfigDict, dict]:
    """Load weights from any supported source -> (model_cfg, variables as numpy).

    `path` is a file or folder (see the module docstring) or, when nothing exists
    at that path, the name of a bundled model (`msit_jax.weights.available()`,
    e.g. "msit-lite"); a real path always wins (`resolve`)."""
    path = resolve(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, SAFETENSORS_FILE)):  # a model-hub folder
            return load_safetensors(os.path.join(path, SAFETENSORS_FILE), model_cfg)
        if model_dir.is_model_dir(path):
            return model_dir.load_model(path)
        if is_training_workdir(path):  # its best (else latest) checkpoint
            cfg, variables = load_workdir_model(path)
            # The restore reads what the checkpoint holds; before anything is built for
            # the config, its sizes must be those of the restored variables.
            config_check.check(cfg, config_check.official_names(variables), path,
                               f"its {model_dir.CONFIG_FILE}")
            return cfg, variables
        raise FileNotFoundError(f"{path} is a directory but neither a model folder "
                                f"({SAFETENSORS_FILE}) nor a msit-jax model checkpoint nor a "
                                "training workdir")
    if path.endswith(".safetensors"):
        return load_safetensors(path, model_cfg)
    return load_pth(path, model_cfg)
