"""Upscale images to any size with MSIT.

    msit-upscale photo.png --scale 3 --output out/      # the bundled msit-lite weights
    msit-upscale photo.jpg --checkpoint epoch-best.pth --scale 3.5 --output out/
    msit-upscale a.png b.png --checkpoint ckpt/ --scale 2,3 --output out/
    msit-upscale photos/ --scale 2 --output out/ --suffix _x2   # out/NAME_x2.png per image
    msit-upscale 'photos/*.jpg' --scale 2 --output out/ --suffix _x2.jpg  # JPEG outputs
    msit-upscale icon.png --checkpoint ckpt/ --size 4100x4100 --output big.webp
    msit-upscale --input a.png --model epoch-best.pth --resolution 300,400 \\
        --output b.png                                   # the official demo's flags

Sizes are H x W, height first, everywhere: --size 300x400 (or --resolution
300,400) is 300 pixels high and 400 wide, and the log prints sizes the same
way. Without --checkpoint (or --model) the weights bundled with the package,
msit-lite (`msit_jax.weights`), are used. Scales are any numbers >= 1 (per axis with "SY,SX"; the output is
round(H * SY) x round(W * SX)). Memory stays bounded: the encoder runs once
per image (or per LR tile with --tile, for inputs whose encoder activations
don't fit) and the HR pixels are decoded in fixed-size chunks. Inputs:
anything Pillow reads (PNG, JPEG, ...), as arguments or --input. Grayscale is
replicated to RGB; 16-bit images are reduced to 8 bits; an alpha channel is
upscaled separately with bicubic interpolation and kept (--alpha drop removes
it). An input may be a directory (its images, sorted, not recursive) or a
quoted glob pattern ('photos/*.png'; the images it matches, sorted). Outputs
are 8-bit images, written atomically, in the format of the output's extension:
--output FILE.png|.jpg|.jpeg|.webp|.bmp|.tif|.tiff for one input, or a
directory, which gets INPUT_STEM + --suffix + .png per input (a --suffix ending
in one of those extensions chooses that format: --suffix _x2.jpg). JPEG keeps
no alpha (it is dropped, with a note); WebP is written lossless, JPEG at
quality 95. An output never replaces an input, and an existing output is
replaced only with --overwrite.

Before any work the output sizes, the decoder chunk and the encoder tile are
checked against --max_memory_gb. Each input is processed independently: one
that fails (unreadable, over Pillow's decompression-bomb limit, over the memory
budget, a non-finite model output) is reported in one line and skipped, and the
others go on. Progress (timed stages: load checkpoint, fold, compile+encode,
decode) goes to stderr, with one bar over the images when there are several;
--quiet leaves only errors. The command line keeps compiled programs in JAX's
persistent compilation cache (--nocompile_cache, MSIT_JAX_NO_COMPILE_CACHE=1: off;
see msit_jax.console), and ends with a line saying how many programs it loaded
from there. Errors are one line with
the exit codes of `msit_jax.errors` (1 when inputs failed with different
causes); --verbose adds tracebacks and third-party logs. Flags are absl flags:
booleans are --fold / --nofold, --progress / --noprogress.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import re
import sys
import time
import traceback
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from absl import flags
from PIL import Image

from msit_jax import console, errors, flags_util, images, weights
from msit_jax.errors import OutputError, UsageError
from msit_jax.inference import budget, frontend
from msit_jax.inference.api import Upscaler
from msit_jax.ops.runtime import RuntimeOptions

PROG = "msit-upscale"
USAGE = f"usage: {PROG} [flags] INPUT...\n\n{__doc__}"

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


# Output formats by extension: Pillow's format name and its save options (WebP lossless:
# the model's output, not a re-compression of it).
OUTPUT_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".png": ("PNG", {}), ".jpg": ("JPEG", {"quality": 95}), ".jpeg": ("JPEG", {"quality": 95}),
    ".webp": ("WEBP", {"lossless": True}), ".bmp": ("BMP", {}), ".tif": ("TIFF", {}),
    ".tiff": ("TIFF", {})}
NO_ALPHA_FORMATS = ("JPEG",)
_GLOB_CHARS = re.compile(r"[*?[]")


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
    return frontend.check_scale(vals, "--scale", text)


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """'HxW' or 'H,W' -> (H, W), positive integers, height first (`flag` names it in errors)."""
    m = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*", text.lower())
    if not m or min(int(m.group(1)), int(m.group(2))) < 1:
        raise UsageError(f"{flag} must be the output size H x W in pixels, height first, "
                         f"e.g. 2048x3072 or 2048,3072, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def input_size(path: str) -> tuple[int, int]:
    """(H, W) of an image file from its header (no pixels decoded); ImageError names it."""
    with images.open_image(path) as img:
        return img.size[1], img.size[0]


def read_input(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """An image file -> (RGB (H, W, 3) uint8, alpha (H, W) uint8 or None).

    Raises images.ImageError naming the file when it cannot be decoded
    (ImageTooLargeError over Pillow's decompression-bomb limit).
    """
    with images.open_image(path) as img:
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise images.unreadable_error(path, e) from e
        rgb = images.pil_to_rgb_uint8(img, path)
        alpha = None
        if img.mode in ALPHA_MODES or "transparency" in img.info:
            alpha = np.asarray(img.convert("RGBA").getchannel("A"), np.uint8).copy()
    return rgb, alpha


def expand_inputs(args: Sequence[str]) -> list[str]:
    """The input files named by `args`, in order: a directory gives its images
    (`images.list_images`: sorted, not recursive), a glob pattern that is not itself a
    path gives the images it matches (sorted), anything else is itself (a missing or
    unreadable file is reported when its turn comes, as is a directory without images).
    A file named twice is processed once. UsageError for a pattern that matches no image.
    """
    out: list[str] = []
    for arg in args:
        listed = images.list_images(arg) if os.path.isdir(arg) else []
        if listed:
            found = listed
        elif not os.path.exists(arg) and _GLOB_CHARS.search(arg):
            found = sorted(p for p in glob.glob(arg) if os.path.isfile(p)
                           and p.lower().endswith(images.IMAGE_EXTENSIONS))
            if not found:
                raise UsageError(f"{arg}: no image file matches this pattern "
                                 f"({', '.join(images.IMAGE_EXTENSIONS)})")
        else:
            found = [arg]
        out.extend(p for p in found if p not in out)
    return out


def output_format(path: str) -> Optional[str]:
    """Pillow's format for an output path by its extension (OUTPUT_FORMATS), or None."""
    fmt = OUTPUT_FORMATS.get(os.path.splitext(path)[1].lower())
    return fmt[0] if fmt else None


def _blocking_file(path: str) -> Optional[str]:
    """The nearest existing ancestor of `path` if it is not a directory (then nothing can
    be created under it), else None."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent if parent and not os.path.isdir(parent) else None


def output_paths(inputs: Sequence[str], output: str, suffix: str = "") -> list[str]:
    """One output path per input: `output` itself for one input and an image file name
    (OUTPUT_FORMATS), else output/STEM + suffix (+ .png unless `suffix` ends in an image
    extension); UsageError when `output` cannot hold them (several inputs, one file)."""
    if os.sep in suffix or (os.altsep and os.altsep in suffix):
        raise UsageError(f"--suffix {suffix}: a file name ending, not a path")
    exts = ", ".join(OUTPUT_FORMATS)
    if len(inputs) == 1 and output_format(output) and not os.path.isdir(output):
        paths = [output]
    else:
        is_dir = os.path.isdir(output)
        # A name with an extension, or an existing file, is one file: with several
        # inputs that is the problem to report, whatever the extension.
        if not is_dir and len(inputs) > 1 and (os.path.splitext(output)[1]
                                               or os.path.exists(output)):
            raise UsageError(f"{len(inputs)} inputs but --output {output} is a single file; "
                             "give a directory")
        if not is_dir and os.path.splitext(output)[1]:
            raise UsageError(f"--output {output}: outputs are PNG or another image format "
                             f"by extension ({exts}); give an image file (one input) or a "
                             "directory")
        if os.path.exists(output) and not is_dir:
            raise UsageError(f"--output {output}: is a file, not an image name; give an "
                             f"image file ({exts}) or a directory")
        ending = suffix if output_format(suffix) else suffix + ".png"
        paths = [os.path.join(output, os.path.splitext(os.path.basename(p))[0] + ending)
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
    """Save float [0, 1] RGB (H, W, 3) (+ uint8 alpha (H, W)) as an 8-bit image in the
    format of `path`'s extension (PNG when it has none of OUTPUT_FORMATS), atomically:
    written beside `path` and renamed. A format without alpha (JPEG) drops it."""
    rgb8 = images.to_uint8(rgb)
    fmt, options = OUTPUT_FORMATS.get(os.path.splitext(path)[1].lower(), OUTPUT_FORMATS[".png"])
    if fmt in NO_ALPHA_FORMATS:
        alpha = None
    images.save_image(path, rgb8 if alpha is None else np.dstack([rgb8, alpha]), fmt,
                      **options)


def build_upscaler(checkpoint: str, fold: bool, chunk: Optional[int], tile: Any,
                   method: str = "auto", runtime: Optional[RuntimeOptions] = None, *,
                   quiet: bool = True, self_ensemble: bool = False) -> Upscaler:
    """`Upscaler.from_pretrained` with the command's timed stages ('load checkpoint',
    'fold') on stderr unless `quiet`. tile: 'auto' or an LR tile side (0: none)."""
    return Upscaler.from_pretrained(checkpoint, fold=fold, chunk=chunk, tile=tile,
                                    method=method, runtime=runtime,
                                    self_ensemble=self_ensemble, quiet=quiet,
                                    label="checkpoint")


@contextlib.contextmanager
def _encode_stage(label: str, quiet: bool, then: Any) -> Iterator[None]:
    """The engine's 'encode' stage as the timed '{label}compile+encode' line; then() is
    called when it is done (the decode stage starts there)."""
    with console.stage(f"{label}compile+encode", quiet=quiet):
        yield
    then()


class _DecodeBar:
    """progress(done, total) for an Upscaler call: a tqdm bar over decoder chunks on
    stderr, opened at the first report (only then is the number of chunks known)."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="chunk", file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _ImagesBar:
    """A tqdm bar over the images of a run, on stderr; `write` prints a line above it."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total, desc="images", unit="image", file=sys.stderr)

    def write(self, message: str) -> None:
        self._tqdm.write(message, file=sys.stderr)

    def update(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------- flags

def define_flags(fv: flags.FlagValues) -> None:
    """The command's flags, on `fv` (a private FlagValues: the global absl FLAGS would
    clash with evaluate.py's flags of the same names in one process)."""
    flags.DEFINE_multi_string("input", [], "Input image, directory of images or quoted glob "
                              "pattern (the official demo's flag); repeat it, or give the "
                              "inputs as arguments.", flag_values=fv)
    flags.DEFINE_string("checkpoint", weights.DEFAULT, "Weights: official MSIT .pth, "
                        ".safetensors, a msit-jax checkpoint or training workdir, or a bundled "
                        f"model name ({', '.join(weights.available())}; a real path of that "
                        f"name wins). Default: the bundled {weights.DEFAULT}.", flag_values=fv)
    flags.DEFINE_alias("model", "checkpoint", flag_values=fv)
    flags.DEFINE_string("scale", None, "Scale factor >= 1, e.g. 3.5, or per axis 'SY,SX' "
                        "(height first).", flag_values=fv)
    flags.DEFINE_string("size", None, "Output size H x W in pixels, height first, e.g. "
                        "4100x4100 or 300x400 (300 high, 400 wide).", flag_values=fv)
    flags.DEFINE_string("resolution", None, "Output size 'H,W', height first (the official "
                        "demo's flag; same as --size H x W).", flag_values=fv)
    flags.DEFINE_string("output", None, "Output image (one input; the format by extension: "
                        f"{', '.join(OUTPUT_FORMATS)}) or directory (written as "
                        "STEM + --suffix + .png).", short_name="o", flag_values=fv)
    flags.DEFINE_string("suffix", "", "Appended to each input's name in an --output "
                        "directory: --suffix _x2 writes NAME_x2.png; ending in an image "
                        "extension it chooses the format (--suffix _x2.jpg). Default: none "
                        "(NAME.png).", flag_values=fv)
    flags.DEFINE_bool("fold", True, "Fold RIMs/BatchNorms into plain convs first (faster; "
                      "--nofold keeps the training form).", flag_values=fv)
    flags.DEFINE_integer("chunk", None, "HR pixels per decoder call: memory vs. speed "
                         "(default: 4096 on CPU, 16384 on GPU/TPU).", flag_values=fv)
    flags_util.define_execution_flags(fv)
    flags.DEFINE_string("tile", "auto", "LR tile size for the encoder (0: whole image; "
                        "'auto': tile only when the estimated encoder memory exceeds "
                        "--max_memory_gb).", flag_values=fv)
    flags.DEFINE_float("max_memory_gb", 4.0, "Memory budget per image: outputs, --chunk and "
                       "--tile are checked against it before any work, and --tile auto "
                       "tiles the encoder to fit it.", flag_values=fv)
    flags.DEFINE_bool("self_ensemble", False, "Geometric self-ensemble (EDSR+): the mean of "
                      "the outputs for the 8 flips/transposes of the input, usually a little "
                      "sharper. 8x the work and time.", flag_values=fv)
    flags.DEFINE_enum("alpha", "keep", ["keep", "drop"], "Alpha channel: upscale "
                      "bicubically and keep, or drop.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Progress bar over the decoder chunks (--noprogress: "
                      "a timed 'decode' line instead).", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace existing output files (never an input).",
                      flag_values=fv)
    flags.DEFINE_bool("quiet", False, "Print only errors (no stages, progress or per-image "
                      "lines).", flag_values=fv)
    flags_util.define_verbose(fv)
    flags_util.define_compile_cache(fv)


# ---------------------------------------------------------------------------- command

def _check_flags(f: flags.FlagValues, inputs: Sequence[str]):
    """Validated (scale, size, size flag, outputs, runtime); UsageError / OutputError /
    ResourceError."""
    if not inputs:
        raise UsageError("give at least one input image (as arguments or --input)")
    if not f.checkpoint:
        raise UsageError("--checkpoint is empty: give the weights (a path or a bundled model: "
                         f"{', '.join(weights.available())}), or leave it out for "
                         f"{weights.DEFAULT}")
    if f.output is None:
        raise UsageError("give --output: a .png file (one input) or a directory")
    given = [n for n in ("scale", "size", "resolution") if f[n].value is not None]
    if len(given) != 1:
        raise UsageError("give one of --scale S, --size HxW or --resolution H,W" +
                         (f", not {' and '.join('--' + n for n in given)}" if given else ""))
    scale = parse_scale(f.scale) if f.scale is not None else None
    size_flag = "--" + given[0]
    size = parse_size(f[given[0]].value, size_flag) if scale is None else None
    if f.chunk is not None and f.chunk < 1:
        raise UsageError(f"--chunk must be >= 1, got {f.chunk}")
    budget.budget_bytes(f.max_memory_gb)  # refused before anything else is read
    try:
        runtime = RuntimeOptions(f.precision, f.dtype, f.fft_min_kernel)
    except ValueError as e:
        raise UsageError(f"--fft_min_kernel: {e}") from None
    budget.parse_tile(f.tile)
    outs = output_paths(inputs, f.output, f.suffix)
    check_outputs(inputs, outs, f.overwrite)
    if size is not None:  # before the model loads (the image's own check comes later)
        budget.check_output(size, f.max_memory_gb, f"{size_flag} {f[given[0]].value}")
    return scale, size, size_flag, outs, runtime


def _upscale(f: flags.FlagValues, positionals: Sequence[str]) -> int:
    """The command on parsed flags: upscale every input; the exit status."""
    console.quiet_logs(f.verbose)
    quiet = f.quiet
    try:
        inputs = expand_inputs(list(positionals) + list(f.input))
        scale, size, size_flag, outs, runtime = _check_flags(f, inputs)
    except (errors.MsitError, ValueError) as e:
        return errors.report(e, f.verbose)
    try:
        up = build_upscaler(f.checkpoint, f.fold, f.chunk, 0, f.decoder, runtime,
                            quiet=quiet, self_ensemble=f.self_ensemble)
    except Exception as e:  # noqa: BLE001 - one line naming the checkpoint
        return errors.report(e, f.verbose)
    try:
        tile = budget.parse_tile(f.tile, up.model_cfg)
        budget.check_decoder(up.model_cfg, up.chunk, f.max_memory_gb,
                             f"--chunk {f.chunk}" if f.chunk else None)
    except errors.MsitError as e:
        return errors.report(e, f.verbose)

    failed: list[tuple[str, int]] = []
    pairs = list(zip(inputs, outs))
    # Several images: one bar over them, and a line per image above it; the stages and
    # the bar over each image's decoder chunks would share the bar's terminal line.
    overall = _ImagesBar(len(pairs)) if len(pairs) > 1 and f.progress and not quiet else None
    say = overall.write if overall is not None else functools.partial(console.note, quiet=quiet)
    stage_quiet = quiet or overall is not None  # the compile+encode stage line
    for i, (path, out) in enumerate(pairs):
        # Per-image lines name the image; with several, also how far along the run is.
        tag = f"[{i + 1}/{len(pairs)}] {path}: " if len(pairs) > 1 else f"{path}: "
        try:
            in_hw = input_size(path)
            hw = frontend.output_size(in_hw, scale, size, name=path, flag=size_flag)
            # The image buffers (set by --scale/--size) and the encoder (set by --tile;
            # 'auto' tiles it to fit) against the budget; the decoder (--chunk) was
            # checked once above.
            what = (f"--scale {f.scale}" if scale is not None
                    else f"{size_flag} {f[size_flag[2:]].value}")
            plan = up.plan(in_hw, hw, tile=tile, max_memory_gb=f.max_memory_gb, name=path,
                           what=what, decoder=False)
            rgb, alpha = read_input(path)
            t0 = time.perf_counter()
            sr = _decode(up, plan, images.to_float(rgb), hw, tag, stage_quiet, f.progress)
            frontend.check_finite(sr, path, f"; nothing written (are the weights in "
                                            f"{f.checkpoint} corrupt?)")
            sr = np.clip(sr, 0.0, 1.0)
            if alpha is not None and f.alpha == "keep" and output_format(out) in NO_ALPHA_FORMATS:
                say(f"{tag}{output_format(out)} has no alpha channel: alpha dropped in {out}")
                alpha = None
            if alpha is not None and f.alpha == "keep":
                alpha = np.asarray(Image.fromarray(alpha).resize((hw[1], hw[0]), Image.BICUBIC))
            else:
                alpha = None
            try:
                save_output(out, sr, alpha)
            except OSError as e:
                raise OutputError(f"{out}: cannot be written ({e.strerror or e})") from e
            say(f"{tag}{console.format_hw(rgb.shape[:2])} -> {console.format_hw(hw)} "
                f"(H x W), wrote {out} ({time.perf_counter() - t0:.1f} s)")
        except Exception as e:  # noqa: BLE001 - each input fails on its own
            if f.verbose:
                traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
            msg = errors.describe(e)
            if isinstance(e, MemoryError):
                msg = f"{path}: out of memory ({msg}); lower --chunk or --max_memory_gb"
            failed.append((path, errors.exit_code_for(e)))
            if overall is not None:
                overall.write(f"error: {msg}")
            else:
                print(f"error: {msg}", file=sys.stderr, flush=True)
        if overall is not None:
            overall.update()
    if overall is not None:
        overall.close()
    console.note_compile_cache(quiet=quiet)
    if failed:
        print(f"error: {len(failed)} of {len(pairs)} input(s) failed: "
              f"{', '.join(p for p, _ in failed)}", file=sys.stderr)
        codes = {c for _, c in failed}
        return codes.pop() if len(codes) == 1 else errors.EXIT_FAILURE
    return 0


def _decode(up: Upscaler, plan: Any, lr: np.ndarray, hw: tuple[int, int], tag: str,
            quiet: bool, progress: bool) -> np.ndarray:
    """up(lr (H, W, 3), hw) as `plan` says -> (hw[0], hw[1], 3) float32, unclamped, with
    its stages: 'compile+encode' (untiled), then 'decode' (with the encoder when tiled)
    as a bar over chunks (progress) or one timed line."""
    label = f"{tag}{'encode+decode (tiled)' if plan.tile else 'decode'}"
    if up.self_ensemble:
        label += " x8 (self-ensemble)"
    bar = _DecodeBar(label) if progress and not quiet else None
    with contextlib.ExitStack() as stages:
        started = []

        def decode_stage() -> None:
            # A stage line and a bar would share one terminal line: one or the other.
            # Once: a self-ensemble encodes 8 times, and its 8 decodes are one stage.
            if bar is None and not started:
                started.append(True)
                stages.enter_context(console.stage(label, quiet=quiet))

        if plan.tile:
            decode_stage()
        try:
            return up.upscale_array(
                lr, hw, clamp=False, progress=bar if bar is not None else False, plan=plan,
                stage=lambda name: _encode_stage(tag, quiet, decode_stage))
        finally:
            if bar is not None:
                bar.close()


main = flags_util.entry_point(define_flags, _upscale, USAGE, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
