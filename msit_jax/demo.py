"""A local web demo: upload an image, pick a scale, compare MSIT with bicubic.

    pip install -r requirements-demo.txt
    python -m msit_jax.demo                              # the bundled msit-lite weights
    python -m msit_jax.demo --checkpoint epoch-best.pth [--port 7860] [--host 127.0.0.1]

The checkpoint is anything `msit_jax.Upscaler.from_pretrained` reads; without
--checkpoint the demo serves the weights bundled with the package, msit-lite
(`msit_jax.weights`). The page
has an image upload, a scale slider (1 to 30) or an exact output size (height
x width), the MSIT result beside a Pillow-bicubic upscale of the same size, a
swipe comparison, a PNG download, and the measured time. Sizes are always
written H x W (height first).

Large outputs use the CLI's memory-bounded path (`msit_jax.tiling`): the HR
pixels are decoded in fixed-size chunks, and the encoder runs on LR tiles when
its estimated activations exceed --max_memory_gb (`tiling.auto_tile`); output
sizes whose buffers exceed the budget are refused with a message.

The core, `upscale_pair`, is a plain function (no gradio) that tests call
directly; gradio is imported only when the page is built.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np
from absl import flags
from PIL import Image, UnidentifiedImageError

from msit_jax import errors, flags_util, images, tiling, weights
from msit_jax.api import Upscaler

INSTALL_HINT = "pip install -r requirements-demo.txt"
SCALE_MIN, SCALE_MAX = 1.0, 30.0
# Estimated bytes per pixel (see msit_jax/upscale.py, measured there): the output's float32
# prediction, its copies and the uint8 images (MSIT and bicubic); the decoded input.
OUTPUT_BYTES_PER_PIXEL = 72
INPUT_BYTES_PER_PIXEL = 40
KEEP_RESULTS = 8  # result folders kept on disk (older ones are deleted)
QUIET_LOGGERS = ("absl", "orbax", "tensorstore", "jax", "asyncio", "httpx", "httpcore",
                 "gradio", "uvicorn", "uvicorn.error", "uvicorn.access", "matplotlib")

Progress = Optional[Callable[[int, int], Any]]


class DemoError(ValueError):
    """A request the demo refuses (bad upload, scale or size); the message is for the page."""


# ---------------------------------------------------------------- core (no gradio)


def read_upload(path: str) -> tuple[np.ndarray, str]:
    """An uploaded image file -> (RGB (H, W, 3) uint8, a note: '' or what was changed).

    Grayscale is replicated to RGB, 16-bit is reduced to 8 bits, alpha is dropped.
    DemoError (no server paths in the message) for anything Pillow cannot decode.
    """
    try:
        with Image.open(path) as img:
            img.load()
            rgb = images.pil_to_rgb_uint8(img, "the upload")
            has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    except Image.DecompressionBombError as e:
        raise DemoError(f"The image is too large: {e}") from None
    except images.ImageError as e:
        raise DemoError(str(e)) from None
    except UnidentifiedImageError:
        raise DemoError("The upload is not an image Pillow can read (PNG, JPEG, WebP, BMP, "
                        "TIFF, ...).") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DemoError(f"The image could not be decoded (truncated or corrupt?): {e}") from None
    return rgb, "alpha channel dropped" if has_alpha else ""


def output_hw(in_hw: tuple[int, int], scale: float, out_h: Optional[float],
              out_w: Optional[float]) -> tuple[int, int]:
    """The output (H, W): the exact size when out_h and out_w are given (> 0), else
    (round(H * scale), round(W * scale)). DemoError for a scale outside 1..30, one
    size without the other, or a size smaller than the input."""
    given = [v for v in (out_h, out_w) if v not in (None, 0, "")]
    if given:
        if len(given) != 2:
            raise DemoError("Give both the output height and width (H x W), or neither "
                            "to use the scale.")
        h, w = float(out_h), float(out_w)
        if not (h.is_integer() and w.is_integer()) or min(h, w) < 1:
            raise DemoError(f"The output size must be whole pixels, got {out_h:g} x {out_w:g} "
                            "(H x W).")
        h, w = int(h), int(w)
        if h < in_hw[0] or w < in_hw[1]:
            raise DemoError(f"The output {h} x {w} (H x W) is smaller than the input "
                            f"{in_hw[0]} x {in_hw[1]}: MSIT only upsamples.")
        return h, w
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise DemoError(f"The scale must be a number, got {scale!r}.") from None
    if not SCALE_MIN <= s <= SCALE_MAX:  # also refuses NaN
        raise DemoError(f"The scale must be between {SCALE_MIN:g} and {SCALE_MAX:g}, "
                        f"got {s:g}.")
    return max(1, round(in_hw[0] * s)), max(1, round(in_hw[1] * s))


def check_memory(in_hw: tuple[int, int], out_hw: tuple[int, int], max_memory_gb: float) -> None:
    """DemoError when the image buffers of in_hw -> out_hw (H, W) exceed the budget."""
    need = (out_hw[0] * out_hw[1] * OUTPUT_BYTES_PER_PIXEL
            + in_hw[0] * in_hw[1] * INPUT_BYTES_PER_PIXEL)
    if need > max_memory_gb * 2 ** 30:
        raise DemoError(f"The output {out_hw[0]} x {out_hw[1]} (H x W) needs ~"
                        f"{need / 2 ** 30:.2g} GB, over this demo's limit of "
                        f"{max_memory_gb:g} GB (--max_memory_gb): choose a smaller scale "
                        "or size.")


@functools.lru_cache(maxsize=4)
def tiled_engine(up: Any):
    """A `tiling.TiledUpscaler` sharing `up.engine`'s model and weights (built once per `up`)."""

    e = up.engine
    return tiling.TiledUpscaler(e.model_cfg, e.variables, chunk=e.chunk, tile=0,
                                method=e.method, runtime=e.runtime)


def upscale_pair(up: Any, image: Any, scale: float = 4.0, out_h: Optional[float] = None,
                 out_w: Optional[float] = None, *, max_memory_gb: float = 4.0,
                 progress: Progress = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """MSIT and Pillow-bicubic upscales of one image to the same size.

    up: a `msit_jax.Upscaler`; image: (H, W, 3) uint8 RGB or a PIL image; the size is
    (out_h, out_w) when both are given, else round((H, W) * scale). Returns
    (sr, bicubic, info): sr and bicubic (out_h, out_w, 3) uint8, and info with
    'in_hw', 'out_hw' (H, W), 'seconds' (the MSIT call), 'bicubic_seconds',
    'tile' (0: the encoder ran on the whole image) and 'decoder'.
    The encoder is tiled as the CLI's `--tile auto` does, to stay within
    max_memory_gb. progress(done, total) is called per decoded chunk.
    """

    rgb = images.pil_to_rgb_uint8(image) if isinstance(image, Image.Image) else np.asarray(image)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3 or min(rgb.shape[:2]) < 1:
        raise DemoError(f"The image must be RGB uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}.")
    in_hw = (int(rgb.shape[0]), int(rgb.shape[1]))
    hw = output_hw(in_hw, scale, out_h, out_w)
    check_memory(in_hw, hw, max_memory_gb)
    engine = copy.copy(tiled_engine(up))  # a per-call tile; the model is shared
    engine.tile = tiling.auto_tile(engine.model_cfg, in_hw, max_memory_gb * 2 ** 30)
    t0 = time.perf_counter()
    sr = engine(images.to_float(rgb), hw, clamp=False, progress=progress or False)
    seconds = time.perf_counter() - t0
    if not np.isfinite(sr).all():
        raise DemoError("The model output has non-finite values: are the weights corrupt?")
    t0 = time.perf_counter()
    bicubic = images.resize_bicubic(rgb, hw)
    info = {"in_hw": in_hw, "out_hw": hw, "seconds": seconds,
            "bicubic_seconds": time.perf_counter() - t0, "tile": engine.tile,
            "decoder": "grid" if engine.uses_grid(in_hw, hw) else "query"}
    return images.to_uint8(np.clip(sr, 0.0, 1.0)), bicubic, info


def format_info(info: dict, note: str = "") -> str:
    """Markdown for the page: the sizes (H x W) and the measured times."""
    (h, w), (oh, ow) = info["in_hw"], info["out_hw"]
    tile = f"encoder tiles of {info['tile']} px" if info["tile"] else "whole-image encoder"
    lines = [f"**Output: {oh} x {ow}** (H x W) from {h} x {w}, "
             f"x{oh / h:.3g} (H) x{ow / w:.3g} (W)",
             f"**MSIT: {info['seconds']:.2f} s** ({info['decoder']} decoder, {tile}; the "
             "first run at a new size includes JIT compilation) · bicubic: "
             f"{info['bicubic_seconds'] * 1000:.0f} ms"]
    if note:
        lines.append(f"Note: {note}.")
    return "\n\n".join(lines)


def save_results(out_dir: str, stem: str, sr: np.ndarray, bicubic: np.ndarray) -> tuple[str, str]:
    """Write both (H, W, 3) uint8 images as PNG in a new folder under out_dir (the newest
    KEEP_RESULTS folders are kept) -> (sr_path, bicubic_path)."""
    os.makedirs(out_dir, exist_ok=True)
    old = sorted((os.path.join(out_dir, d) for d in os.listdir(out_dir)), key=os.path.getmtime)
    for d in old[:max(0, len(old) - KEEP_RESULTS + 1)]:
        shutil.rmtree(d, ignore_errors=True)
    folder = tempfile.mkdtemp(dir=out_dir)
    h, w = sr.shape[:2]
    sr_path = os.path.join(folder, f"{stem}_msit_{h}x{w}.png")
    bic_path = os.path.join(folder, f"{stem}_bicubic_{h}x{w}.png")
    images.save_png(sr_path, sr)
    images.save_png(bic_path, bicubic)
    return sr_path, bic_path


# ---------------------------------------------------------------- the page (gradio)


def import_gradio():
    """gradio, or ImportError with the install command in one line."""
    try:
        import gradio
    except ImportError:
        raise ImportError(f"the demo needs gradio: {INSTALL_HINT}") from None
    return gradio


def _readable(gr, component: Any, message: Callable[[Exception, Any], str]) -> Any:
    """`component` with its input checks and decoding failures turned into
    gr.Error(message(exc, payload)) on the page, without a traceback in the server log.

    Wraps the instance's preprocess: a subclass would make gradio write a .pyi stub
    beside this file, and a renamed one a new frontend class."""
    preprocess = component.preprocess

    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except Exception as e:  # noqa: BLE001 - any failure here is a bad input
            raise gr.Error(message(e, payload), print_exception=False) from None

    component.preprocess = checked
    return component


def _image_message(e: Exception, payload: Any) -> str:
    if isinstance(e, Image.DecompressionBombError):
        return f"The image is too large: {e}"
    return "The upload is not an image Pillow can read (PNG, JPEG, WebP, BMP, TIFF, ...)."


def _scale_message(e: Exception, payload: Any) -> str:
    return f"The scale must be between {SCALE_MIN:g} and {SCALE_MAX:g}, got {payload}."


def _size_message(e: Exception, payload: Any) -> str:
    return f"The output height and width must be whole pixels >= 0, got {payload}."


def make_handler(up: Any, out_dir: str, max_memory_gb: float):
    """The click handler: (upload path, scale, out_h, out_w) -> the page's outputs
    (MSIT PNG, bicubic PNG, (bicubic, MSIT) for the slider, download path, info)."""
    gr = import_gradio()

    def run(path: Optional[str], scale: float, out_h: Optional[float], out_w: Optional[float],
            progress=gr.Progress()):
        if not path:
            raise gr.Error("Upload an image first.", print_exception=False)
        try:
            rgb, note = read_upload(path)
            progress(0.0, desc="encoding")
            sr, bic, info = upscale_pair(
                up, rgb, scale, out_h, out_w, max_memory_gb=max_memory_gb,
                progress=lambda done, total: progress((done, total), desc="decoding",
                                                      unit="chunks"))
        except DemoError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except MemoryError:
            raise gr.Error("Out of memory: choose a smaller scale or size.",
                           print_exception=False) from None
        stem = os.path.splitext(os.path.basename(path))[0][:64] or "image"
        sr_path, bic_path = save_results(out_dir, stem, sr, bic)
        return sr_path, bic_path, (bic_path, sr_path), sr_path, format_info(info, note)

    return run


def build_app(up: Any, out_dir: str, *, max_memory_gb: float = 4.0):
    """The gradio Blocks page for the upscaler `up` (not launched); results go under out_dir.
    Gradio's copies of them are deleted an hour after they were made, and at shutdown."""
    gr = import_gradio()
    with gr.Blocks(title="MSIT super-resolution", analytics_enabled=False,
                   delete_cache=(600, 3600)) as app:
        gr.Markdown("# MSIT arbitrary-scale super-resolution\nUpload an image, choose a "
                    "scale (or an exact output size, **H x W**), and compare with bicubic.")
        with gr.Row():
            with gr.Column(scale=1):
                inp = _readable(gr, gr.Image(label="Input image", type="filepath",
                                             image_mode=None, sources=["upload", "clipboard"]),
                                _image_message)
                scale = _readable(gr, gr.Slider(SCALE_MIN, SCALE_MAX, value=4.0, step=0.1,
                                                label="Scale"), _scale_message)
                with gr.Row():
                    out_h, out_w = (
                        _readable(gr, gr.Number(0, precision=0, minimum=0,
                                                label=f"Output {name} (px)"), _size_message)
                        for name in ("height H", "width W"))
                gr.Markdown("Leave H and W at 0 to use the scale.")
                go = gr.Button("Upscale", variant="primary")
            with gr.Column(scale=1):
                info = gr.Markdown("Output size and time appear here.")
                download = gr.DownloadButton("Download PNG (MSIT)")
                slider = gr.ImageSlider(label="Swipe: bicubic | MSIT", type="filepath",
                                        format="png", interactive=False)
        with gr.Row():
            bic = gr.Image(label="Bicubic (Pillow)", format="png", interactive=False)
            sr = gr.Image(label="MSIT", format="png", interactive=False)
        go.click(make_handler(up, out_dir, max_memory_gb), [inp, scale, out_h, out_w],
                 [sr, bic, slider, download, info], api_name="upscale", concurrency_limit=1)
    return app


# ---------------------------------------------------------------- command line


def quiet_logs() -> None:
    """Third-party INFO / WARNING logs off (absl, orbax, JAX, gradio, uvicorn, httpx)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover - absl comes with the runtime requirements
        pass
    warnings.filterwarnings("ignore", category=UserWarning, module="gradio")


PROG = "python -m msit_jax.demo"
USAGE = f"usage: {PROG} [--checkpoint PATH] [flags]\n\n{__doc__}"


def define_flags(fv: flags.FlagValues) -> None:
    """The command's flags, on `fv` (a private FlagValues, see `msit_jax.flags_util`)."""
    flags.DEFINE_string("checkpoint", weights.DEFAULT, "Anything Upscaler.from_pretrained "
                        "reads (.pth, .safetensors, a msit-jax checkpoint or training workdir, "
                        f"a bundled model name: {', '.join(weights.available())}). Default: "
                        f"the bundled {weights.DEFAULT}.", flag_values=fv)
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.", flag_values=fv)
    flags.DEFINE_integer("port", 7860, "Port to listen on.", flag_values=fv)
    flags.DEFINE_float("max_memory_gb", 4.0, "Memory budget per request: larger outputs are "
                       "refused, and the encoder is tiled to fit.", flag_values=fv)
    flags.DEFINE_float("max_file_mb", 50.0, "Largest upload.", flag_values=fv)
    flags.DEFINE_integer("chunk", None, "HR pixels per decoder call.", flag_values=fv)


def _serve_checkpoint(fv: flags.FlagValues, positionals: Sequence[str]) -> int:
    """The command on parsed flags: serve the page until stopped; the exit status."""
    if positionals:
        return errors.report(errors.UsageError(
            f"unexpected arguments: {' '.join(positionals)} (see --help)"))
    if not fv.checkpoint:
        return errors.report(errors.UsageError(
            f"--checkpoint is empty: give a path, or leave it out for {weights.DEFAULT} "
            "(see --help)"))
    quiet_logs()  # before gradio and JAX are imported
    try:
        import_gradio()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return errors.EXIT_USAGE

    try:
        up = Upscaler.from_pretrained(fv.checkpoint, chunk=fv.chunk)
    except Exception as e:  # noqa: BLE001 - one line naming the checkpoint
        print(f"error: cannot load {fv.checkpoint}: {e}", file=sys.stderr)
        return errors.EXIT_FAILURE
    # Results beside gradio's own files (GRADIO_TEMP_DIR when set), removed at exit.
    base = os.environ.get("GRADIO_TEMP_DIR") or None
    if base:
        os.makedirs(base, exist_ok=True)
    out_dir = tempfile.mkdtemp(prefix="msit-demo-", dir=base)
    try:
        return serve(build_app(up, out_dir, max_memory_gb=fv.max_memory_gb), fv)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


main = flags_util.entry_point(define_flags, _serve_checkpoint, USAGE, prog=PROG)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(app: Any, args: flags.FlagValues) -> int:
    """Launch the page, print where it listens, and block until Ctrl+C or SIGTERM."""
    app.queue(max_size=16)
    try:
        _, url, _ = app.launch(server_name=args.host, server_port=args.port, quiet=True,
                               prevent_thread_lock=True, show_error=False, ssr_mode=False,
                               max_file_size=f"{args.max_file_mb:g}mb",
                               footer_links=["api"])
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    print(f"msit-jax demo: listening on {url} (checkpoint {args.checkpoint}; Ctrl+C stops)",
          flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    print("msit-jax demo: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
