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
it). Outputs are 8-bit PNG. An input that fails is reported and skipped; the
exit status is then 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from msit_jax.runtime import DTYPES, PRECISIONS, RuntimeOptions
from msit_jax import images

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class UsageError(ValueError):
    """Bad command-line values (scale, size, output)."""


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


def read_input(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """An image file -> (RGB (H, W, 3) uint8, alpha (H, W) uint8 or None).

    Raises images.ImageError naming the file when it cannot be decoded.
    """
    if not os.path.isfile(path):
        raise images.ImageError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = images.pil_to_rgb_uint8(img, path)
            alpha = None
            if img.mode in ALPHA_MODES or "transparency" in img.info:
                alpha = np.asarray(img.convert("RGBA").getchannel("A"), np.uint8).copy()
    except images.ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise images.ImageError(f"{path}: not a readable image ({e})") from e
    return rgb, alpha


def output_paths(inputs: Sequence[str], output: str) -> list[str]:
    """One PNG path per input: `output` itself for one input and a .png name, else output/stem.png."""
    if len(inputs) == 1 and output.lower().endswith(".png"):
        return [output]
    if os.path.splitext(output)[1] and not os.path.isdir(output):
        raise UsageError(f"--output {output}: outputs are PNG; give a .png file (one input) "
                         "or a directory")
    paths = [os.path.join(output, os.path.splitext(os.path.basename(p))[0] + ".png")
             for p in inputs]
    seen: dict[str, str] = {}
    for inp, out in zip(inputs, paths):
        if out in seen:
            raise UsageError(f"{seen[out]} and {inp} would both be written to {out}")
        seen[out] = inp
    return paths


def save_output(path: str, rgb: np.ndarray, alpha: Optional[np.ndarray]) -> None:
    """Save float [0, 1] RGB (+ uint8 alpha) as an 8-bit PNG."""
    rgb8 = images.to_uint8(rgb)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if alpha is None:
        Image.fromarray(rgb8).save(path)
    else:
        Image.fromarray(np.dstack([rgb8, alpha])).save(path)


def build_upscaler(checkpoint: str, fold: bool, chunk: Optional[int], tile: int,
                   method: str = "auto", runtime: Optional[RuntimeOptions] = None):
    """Load weights (official .pth or msit-jax checkpoint) -> an Upscaler (tiled if tile > 0)."""
    from msit_jax import pretrained, reparam, tiling

    model_cfg, variables = pretrained.load(checkpoint)
    if fold:
        model_cfg, variables = reparam.fold(model_cfg, variables)
    return tiling.TiledUpscaler(model_cfg, variables, chunk=chunk, tile=tile, method=method,
                                runtime=runtime)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m msit_jax.upscale", description=__doc__,
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
                   help="encoder memory budget for --tile auto (default 4)")
    p.add_argument("--alpha", choices=("keep", "drop"), default="keep",
                   help="alpha channel: upscale bicubically and keep (default), or drop")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        scale = parse_scale(args.scale) if args.scale else None
        size = parse_size(args.size) if args.size else None
        outs = output_paths(args.inputs, args.output)
        if args.chunk is not None and args.chunk < 1:
            raise UsageError(f"--chunk must be >= 1, got {args.chunk}")
        try:
            runtime = RuntimeOptions(args.precision, args.dtype, args.fft_min_kernel)
        except ValueError as e:
            raise UsageError(f"--fft_min_kernel: {e}") from None
        if args.tile != "auto" and not re.fullmatch(r"\d+", args.tile):
            raise UsageError(f"--tile must be a non-negative integer or 'auto', got {args.tile}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        up = build_upscaler(args.checkpoint, args.fold, args.chunk,
                            0 if args.tile == "auto" else int(args.tile), args.decoder,
                            runtime)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    from msit_jax import tiling

    failed = []
    bar = None
    pairs = list(zip(args.inputs, outs))
    if args.progress and len(pairs) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc="images", unit="img")
    for path, out in pairs:
        try:
            rgb, alpha = read_input(path)
            hw = output_size(rgb.shape[:2], scale, size, path)
            if args.tile == "auto":
                up.tile = tiling.auto_tile(up.model_cfg, rgb.shape[:2],
                                           args.max_memory_gb * 2 ** 30)
            t0 = time.perf_counter()
            sr = up(images.to_float(rgb), hw, progress=args.progress)
            if alpha is not None and args.alpha == "keep":
                alpha = np.asarray(Image.fromarray(alpha).resize((hw[1], hw[0]), Image.BICUBIC))
            else:
                alpha = None
            save_output(out, sr, alpha)
            msg = (f"{path}: {rgb.shape[1]}x{rgb.shape[0]} -> {hw[1]}x{hw[0]} "
                   f"{out} ({time.perf_counter() - t0:.1f}s)")
            print(msg, file=sys.stderr) if bar is None else bar.write(msg, file=sys.stderr)
        except (images.ImageError, UsageError, ValueError, OSError) as e:
            failed.append(path)
            msg = f"error: {e}"
            print(msg, file=sys.stderr) if bar is None else bar.write(msg, file=sys.stderr)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if failed:
        print(f"error: {len(failed)} of {len(pairs)} input(s) failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
