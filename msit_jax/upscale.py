"""Upscale images to any size with MSIT.

    python -m msit_jax.upscale photo.jpg --checkpoint epoch-best.pth --scale 3.5 --output out/
    python -m msit_jax.upscale a.png b.png --checkpoint ckpt/ --scale 2,3 --output out/
    python -m msit_jax.upscale icon.png --checkpoint ckpt/ --size 4100x4100 --output big.png

Scales are any numbers >= 1 (per axis with "SY,SX"; the output is round(H * SY) x
round(W * SX)), or give the output size with --size HxW. Memory stays bounded:
the encoder runs once per image (or per LR tile with --tile, for inputs whose
encoder activations don't fit) and the HR pixels are decoded in fixed-size
chunks. Inputs: anything Pillow reads (PNG, JPEG, ...). Grayscale is
replicated to RGB; 16-bit images are reduced to 8 bits; an alpha channel is
upscaled separately with bicubic interpolation and kept (--alpha drop removes
it). Outputs are 8-bit PNG, written atomically; an output never replaces an
input, and an existing output is replaced only with --overwrite.

Before any work the output sizes, the decoder chunk and the encoder tile are
checked against --max_memory_gb. Each input is processed independently: one
that fails (unreadable, over Pillow's decompression-bomb limit, over the memory
budget, a non-finite model output) is reported in one line and skipped, and the
others go on. Errors are one line with the exit codes of `msit_jax.errors`
(1 when inputs failed with different causes); --verbose adds tracebacks.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
import traceback
from typing import Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from msit_jax import errors, images
from msit_jax.errors import NonFiniteError, OutputError, ResourceError, UsageError
from msit_jax.ops.runtime import DTYPES, PRECISIONS, RuntimeOptions

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# Memory estimates for the --max_memory_gb checks (bytes). Output: the float32
# prediction, its denormalised copy and the uint8 quantisation (measured peak
# ~60 B per output pixel). Decoder: each query gathers (2r+1)^2 keys of `dim`
# features for Q/K and V with intermediates (~0.6 GB per 4096 queries at the
# paper size). Input: the decoded image and its float copies.
OUTPUT_BYTES_PER_PIXEL = 64
INPUT_BYTES_PER_PIXEL = 40
DECODER_BYTES_PER_QUERY_FEATURE = 12


def parse_scale(text: str) -> tuple[float, float]:
    """'3.5' -> (3.5, 3.5); '2,3' or '2x3' -> (2.0, 3.0) as (height, width) scales, each >= 1."""
    parts = re.split(r"[,x]", text.strip().lower())
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"--scale must be a number or 'SY,SX', got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or not all(np.isfinite(vals)):
        raise UsageError(f"--scale must be a number or 'SY,SX', got {text!r}")
    if min(vals) < 1:
        raise UsageError(f"--scale must be >= 1 (MSIT upsamples; use a resampler to shrink), "
                         f"got {text}")
    return vals[0], vals[1]


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W), positive integers."""
    m = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*", text.lower())
    if not m or min(int(m.group(1)), int(m.group(2))) < 1:
        raise UsageError(f"--size must be HEIGHTxWIDTH in pixels, e.g. 2048x3072, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def output_size(in_hw: tuple[int, int], scale: Optional[tuple[float, float]],
                size: Optional[tuple[int, int]], name: str = "input") -> tuple[int, int]:
    """The HR size: round(H * sy), round(W * sx), or `size` (never smaller than the input)."""
    if size is not None:
        if size[0] < in_hw[0] or size[1] < in_hw[1]:
            raise UsageError(f"{name}: --size {size[0]}x{size[1]} is smaller than the input "
                             f"{in_hw[0]}x{in_hw[1]} (scale < 1; MSIT upsamples only)")
        return size
    return max(1, round(in_hw[0] * scale[0])), max(1, round(in_hw[1] * scale[1]))


def _check_is_file(path: str) -> None:
    if os.path.isdir(path):
        raise images.ImageError(f"{path}: is a directory, not an image file")
    if not os.path.isfile(path):
        raise images.ImageError(f"{path}: no such file")


def input_size(path: str) -> tuple[int, int]:
    """(H, W) of an image file from its header (no pixels decoded); ImageError names it."""
    _check_is_file(path)
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except Image.DecompressionBombError as e:
        raise images.bomb_error(path, e) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise images.ImageError(f"{path}: not a readable image ({e})") from e


def read_input(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """An image file -> (RGB (H, W, 3) uint8, alpha (H, W) uint8 or None).

    Raises images.ImageError naming the file when it cannot be decoded
    (ImageTooLargeError over Pillow's decompression-bomb limit).
    """
    _check_is_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            rgb = images.pil_to_rgb_uint8(img, path)
            alpha = None
            if img.mode in ALPHA_MODES or "transparency" in img.info:
                alpha = np.asarray(img.convert("RGBA").getchannel("A"), np.uint8).copy()
    except images.ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise images.bomb_error(path, e) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise images.ImageError(f"{path}: not a readable image ({e})") from e
    return rgb, alpha


def _blocking_file(path: str) -> Optional[str]:
    """The nearest existing ancestor of `path` if it is not a directory (then nothing can
    be created under it), else None."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent if parent and not os.path.isdir(parent) else None


def output_paths(inputs: Sequence[str], output: str) -> list[str]:
    """One PNG path per input: `output` itself for one input and a .png name, else output/stem.png."""
    if len(inputs) == 1 and output.lower().endswith(".png") and not os.path.isdir(output):
        paths = [output]
    else:
        if os.path.splitext(output)[1] and not os.path.isdir(output):
            raise UsageError(f"--output {output}: outputs are PNG; give a .png file (one "
                             "input) or a directory")
        if os.path.exists(output) and not os.path.isdir(output):
            raise UsageError(f"--output {output}: is a file; give a directory for "
                             f"{len(inputs)} inputs")
        paths = [os.path.join(output, os.path.splitext(os.path.basename(p))[0] + ".png")
                 for p in inputs]
    block = _blocking_file(paths[0])
    if block is not None:
        raise UsageError(f"--output {output}: {block} is a file, not a directory")
    seen: dict[str, str] = {}
    for inp, out in zip(inputs, paths):
        if out in seen:
            raise UsageError(f"{seen[out]} and {inp} would both be written to {out}")
        seen[out] = inp
    return paths


def check_outputs(inputs: Sequence[str], outs: Sequence[str], overwrite: bool) -> None:
    """OutputError unless every output is new (or --overwrite) and none is an input."""
    ins = {os.path.realpath(p): p for p in inputs}
    for inp, out in zip(inputs, outs):
        real = os.path.realpath(out)
        if real in ins or any(os.path.exists(p) and os.path.exists(out)
                              and os.path.samefile(p, out) for p in inputs):
            raise OutputError(f"--output {out} is the input {ins.get(real, inp)}: an output "
                              "never replaces an input; choose another --output")
        if os.path.exists(out) and not overwrite:
            raise OutputError(f"{out} exists (the output for {inp}); pass --overwrite to "
                              "replace it")


def save_output(path: str, rgb: np.ndarray, alpha: Optional[np.ndarray]) -> None:
    """Save float [0, 1] RGB (+ uint8 alpha) as an 8-bit PNG (atomically)."""
    rgb8 = images.to_uint8(rgb)
    images.save_png(path, rgb8 if alpha is None else np.dstack([rgb8, alpha]))


def memory_estimate(model_cfg, in_hw: tuple[int, int], out_hw: tuple[int, int], chunk: int,
                    tile: int) -> dict[str, float]:
    """Estimated peak bytes of one image: {'output', 'input', 'decoder', 'encoder'}
    (the encoder estimate is `tiling.auto_tile`'s: 64 bytes x dim per window pixel)."""
    from msit_jax import tiling

    n = (2 * model_cfg.radius + 1) ** 2
    enc_hw = in_hw if tile <= 0 else tuple(min(s, tile + 2 * tiling.halo(model_cfg))
                                            for s in in_hw)
    return {"output": float(out_hw[0]) * out_hw[1] * OUTPUT_BYTES_PER_PIXEL,
            "input": float(in_hw[0]) * in_hw[1] * INPUT_BYTES_PER_PIXEL,
            "decoder": float(chunk) * n * model_cfg.dim * DECODER_BYTES_PER_QUERY_FEATURE,
            "encoder": float(enc_hw[0]) * enc_hw[1] * 64.0 * model_cfg.dim}


def _gb(x: float) -> str:
    return f"{x / 2 ** 30:.3g} GB"


def build_upscaler(checkpoint: str, fold: bool, chunk: Optional[int], tile: int,
                   method: str = "auto", runtime: Optional[RuntimeOptions] = None):
    """Load weights (official .pth or msit-jax checkpoint) -> an Upscaler (tiled if tile > 0)."""
    from msit_jax.io import pretrained
    from msit_jax.models import reparam
    from msit_jax import tiling

    model_cfg, variables = pretrained.load(checkpoint)
    if fold:
        model_cfg, variables = reparam.fold(model_cfg, variables)
    return tiling.TiledUpscaler(model_cfg, variables, chunk=chunk, tile=tile, method=method,
                                runtime=runtime)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2)."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(errors.EXIT_USAGE)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = _Parser(prog="python -m msit_jax.upscale", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files (PNG, JPEG, ...)")
    p.add_argument("--checkpoint", required=True,
                   help="official MSIT .pth or a msit-jax checkpoint directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--scale", help="scale factor >= 1, e.g. 3.5, or per axis 'SY,SX'")
    g.add_argument("--size", help="output size HEIGHTxWIDTH, e.g. 4100x4100")
    p.add_argument("--output", "-o", required=True,
                   help="output .png (one input) or directory (written as STEM.png)")
    p.add_argument("--fold", action=argparse.BooleanOptionalAction, default=True,
                   help="fold RIMs/BatchNorms into plain convs first (faster; default on)")
    p.add_argument("--chunk", type=int, default=None,
                   help="HR pixels per decoder call: memory vs. speed (default: 4096 on CPU, "
                        "16384 on GPU/TPU)")
    p.add_argument("--decoder", choices=("auto", "grid", "query"), default="auto",
                   help="decoder formulation: grid (queries grouped by LR centre, fast at "
                        "large scales), query (the reference's per-query form) or auto (grid "
                        "from 9 output pixels per input pixel, i.e. x3, on CPU; from 4 on "
                        "GPU/TPU); equal to float32 round-off")
    p.add_argument("--precision", choices=PRECISIONS, default="highest",
                   help="matmul/conv precision: highest (float32, the reference numerics), "
                        "high or default (TF32 / bf16 passes on GPU and TPU)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute dtype (bfloat16: float32 weights and accumulation)")
    p.add_argument("--fft_min_kernel", type=int, default=-1,
                   help="multi-scale convs with kernels at least this large run as FFT "
                        "products; 0 never; -1 (default) per platform (17 on CPU, never on "
                        "GPU/TPU)")
    p.add_argument("--tile", default="auto",
                   help="LR tile size for the encoder (0: whole image; 'auto': tile only when "
                        "the estimated encoder memory exceeds --max_memory_gb)")
    p.add_argument("--max_memory_gb", type=float, default=4.0,
                   help="memory budget per image (default 4): outputs, --chunk and --tile are "
                        "checked against it before any work, and --tile auto tiles the "
                        "encoder to fit it")
    p.add_argument("--alpha", choices=("keep", "drop"), default="keep",
                   help="alpha channel: upscale bicubically and keep (default), or drop")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (never an input)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of errors")
    return p.parse_args(argv)


def _check_flags(args: argparse.Namespace):
    """Validated (scale, size, outputs, runtime); UsageError / OutputError / ResourceError."""
    scale = parse_scale(args.scale) if args.scale is not None else None
    size = parse_size(args.size) if args.size is not None else None
    if args.chunk is not None and args.chunk < 1:
        raise UsageError(f"--chunk must be >= 1, got {args.chunk}")
    if not (math.isfinite(args.max_memory_gb) and args.max_memory_gb > 0):
        raise UsageError(f"--max_memory_gb must be a finite number > 0, got "
                         f"{args.max_memory_gb}")
    try:
        runtime = RuntimeOptions(args.precision, args.dtype, args.fft_min_kernel)
    except ValueError as e:
        raise UsageError(f"--fft_min_kernel: {e}") from None
    if args.tile != "auto" and not re.fullmatch(r"\d+", args.tile):
        raise UsageError(f"--tile must be a non-negative integer or 'auto', got {args.tile}")
    outs = output_paths(args.inputs, args.output)
    check_outputs(args.inputs, outs, args.overwrite)
    budget = args.max_memory_gb * 2 ** 30
    if size is not None and size[0] * size[1] * OUTPUT_BYTES_PER_PIXEL > budget:
        raise ResourceError(
            f"--size {size[0]}x{size[1]} needs ~{_gb(size[0] * size[1] * OUTPUT_BYTES_PER_PIXEL)}"
            f" for the output alone, over --max_memory_gb {args.max_memory_gb:g}")
    return scale, size, outs, runtime


def _say(msg: str, bar) -> None:
    print(msg, file=sys.stderr) if bar is None else bar.write(msg, file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        scale, size, outs, runtime = _check_flags(args)
    except (errors.MsitError, ValueError) as e:
        return errors.report(e, args.verbose)
    try:
        up = build_upscaler(args.checkpoint, args.fold, args.chunk,
                            0 if args.tile == "auto" else int(args.tile), args.decoder,
                            runtime)
    except Exception as e:  # noqa: BLE001 - one line naming the checkpoint
        return errors.report(e, args.verbose)
    budget = args.max_memory_gb * 2 ** 30
    dec = memory_estimate(up.model_cfg, (1, 1), (1, 1), up.chunk, 0)["decoder"]
    if dec > budget:
        flag = f"--chunk {args.chunk}" if args.chunk else f"the default chunk {up.chunk}"
        return errors.report(ResourceError(
            f"{flag} needs ~{_gb(dec)} of decoder memory (dim {up.model_cfg.dim}, radius "
            f"{up.model_cfg.radius}), over --max_memory_gb {args.max_memory_gb:g}"),
            args.verbose)

    from msit_jax import tiling

    failed: list[tuple[str, int]] = []
    bar = None
    pairs = list(zip(args.inputs, outs))
    if args.progress and len(pairs) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc="images", unit="img")
    for path, out in pairs:
        try:
            in_hw = input_size(path)
            hw = output_size(in_hw, scale, size, path)
            if args.tile == "auto":
                up.tile = tiling.auto_tile(up.model_cfg, in_hw, budget)
            # Each part against the budget: the image buffers (set by --scale/--size),
            # the encoder (set by --tile; 'auto' tiles it to fit), the decoder (--chunk,
            # checked once above).
            est = memory_estimate(up.model_cfg, in_hw, hw, up.chunk, up.tile)
            buffers = est["output"] + est["input"]
            if buffers > budget:
                what = f"--scale {args.scale}" if scale is not None else f"--size {args.size}"
                raise ResourceError(
                    f"{path}: {in_hw[1]}x{in_hw[0]} -> {hw[1]}x{hw[0]} ({what}) needs "
                    f"~{_gb(buffers)} for the image buffers, over --max_memory_gb "
                    f"{args.max_memory_gb:g}")
            if est["encoder"] > budget and args.tile != "auto":
                raise ResourceError(
                    f"{path}: --tile {args.tile} on a {in_hw[1]}x{in_hw[0]} input needs "
                    f"~{_gb(est['encoder'])} of encoder memory, over --max_memory_gb "
                    f"{args.max_memory_gb:g}; use --tile auto or a smaller tile")
            rgb, alpha = read_input(path)
            t0 = time.perf_counter()
            sr = up(images.to_float(rgb), hw, clamp=False, progress=args.progress)
            finite = np.isfinite(sr)
            if not finite.all():
                raise NonFiniteError(
                    f"{path}: the model output has {int(finite.size - finite.sum())} non-finite "
                    f"value(s) of {finite.size}; nothing written (are the weights in "
                    f"{args.checkpoint} corrupt?)")
            sr = np.clip(sr, 0.0, 1.0)
            if alpha is not None and args.alpha == "keep":
                alpha = np.asarray(Image.fromarray(alpha).resize((hw[1], hw[0]), Image.BICUBIC))
            else:
                alpha = None
            try:
                save_output(out, sr, alpha)
            except OSError as e:
                raise OutputError(f"{out}: cannot be written ({e.strerror or e})") from e
            _say(f"{path}: {rgb.shape[1]}x{rgb.shape[0]} -> {hw[1]}x{hw[0]} {out} "
                 f"({time.perf_counter() - t0:.1f}s)", bar)
        except Exception as e:  # noqa: BLE001 - each input fails on its own
            if args.verbose:
                traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
            msg = errors.describe(e)
            if isinstance(e, MemoryError):
                msg = f"{path}: out of memory ({msg}); lower --chunk or --max_memory_gb"
            failed.append((path, errors.exit_code_for(e)))
            _say(f"error: {msg}", bar)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if failed:
        print(f"error: {len(failed)} of {len(pairs)} input(s) failed: "
              f"{', '.join(p for p, _ in failed)}", file=sys.stderr)
        codes = {c for _, c in failed}
        return codes.pop() if len(codes) == 1 else errors.EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
