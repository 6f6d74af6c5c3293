"""A local web demo: upload an image, pick a scale, compare MSIT with bicubic.

    pip install "msit-jax[demo]"                 # in a checkout: -r requirements-demo.txt
    msit-demo                                            # the bundled msit-lite weights
    msit-demo --checkpoint epoch-best.pth [--port 7860] [--host 127.0.0.1]
        [--max_seconds 180] [--max_queue 16] [--max_memory_gb 4] [--max_file_mb 50]

The checkpoint is anything `msit_jax.Upscaler.from_pretrained` reads; without
--checkpoint the demo serves the weights bundled with the package, msit-lite
(`msit_jax.weights`). The page
has an image upload, a scale slider (1 to 30) or an exact output size (height
x width), the MSIT result beside a Pillow-bicubic upscale of the same size, a
swipe comparison, a PNG download, and the measured time. Sizes are always
written H x W (height first).

Large outputs use the CLI's memory-bounded path (`Upscaler(..., tile="auto",
max_memory_gb=...)`): the HR pixels are decoded in fixed-size chunks, and the
encoder runs on LR tiles when its estimated activations exceed --max_memory_gb
(`msit_jax.inference.budget`, the one memory model); output sizes whose buffers
exceed the budget are refused with a message.

Serving: it listens on 127.0.0.1 unless --host says otherwise. One model job
runs at a time (gradio's queue, concurrency 1, and a lock for jobs gradio has
let go of); at most --max_queue requests wait, later ones are refused with
"Queue is full". A job whose estimated time (`CostModel`, measured by a warm-up
run at start) exceeds --max_seconds is refused before it runs, and one that
runs past it is stopped at the next decoded chunk. A job whose page was closed
(or that a client cancelled) is dropped from the queue by gradio, or, when
already running, stopped at the next decoded chunk. Errors shown on the page
carry no server path or traceback (`public_message`); internal errors are logged
on the server.

The core, `upscale_pair`, is a plain function (no gradio) that tests call
directly; gradio is imported only when the page is built.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from absl import flags
from PIL import Image, UnidentifiedImageError

from msit_jax import console, errors, flags_util, images, weights
from msit_jax.inference import budget, frontend, tiling
from msit_jax.inference.api import Upscaler

INSTALL_HINT = console.install_hint("demo")
SCALE_MIN, SCALE_MAX = 1.0, 30.0
KEEP_RESULTS = 8  # result folders kept on disk (older ones are deleted)
MAX_SECONDS = 180.0  # default --max_seconds: the longest job, estimated and measured
MAX_QUEUE = 16  # default --max_queue: requests waiting for the model
WARMUP_LR_HW = (32, 32)  # the warm-up input (H, W); see measure_cost
INTERNAL_ERROR = ("Internal error: the request failed on the server (the details are in "
                  "the server's log).")
CANCELLED = "The request was cancelled."
QUIET_LOGGERS = ("absl", "orbax", "tensorstore", "jax", "asyncio", "httpx", "httpcore",
                 "gradio", "uvicorn", "uvicorn.error", "uvicorn.access", "matplotlib")

Progress = Optional[Callable[[int, int], Any]]


class DemoError(ValueError):
    """A request the demo refuses (bad upload, scale, size or time); the message is for
    the page."""


class Cancelled(Exception):
    """The job's client is gone (page closed, or cancelled): stop at the next chunk."""


# An absolute path (POSIX, or Windows with a drive letter) inside a message.
_PATH = re.compile(r"(?:(?<![\w.])/[^\s'\"():,]+)|(?:\b[A-Za-z]:\\[^\s'\"]+)")


def public_message(text: str) -> str:
    """A message for the page: one line at most, without server paths (a last guard:
    the demo's own messages name none, but library and Pillow errors could)."""
    first = next((line for line in str(text).splitlines() if line.strip()), "")
    return _PATH.sub("<file>", first)[:500]


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
        if isinstance(e, OSError) and (e.filename or e.errno):  # the file itself: no path
            raise DemoError("The upload could not be read on the server; upload it "
                            "again.") from None
        raise DemoError("The image could not be decoded (truncated or corrupt?): "
                        f"{public_message(e)}") from None
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
        try:
            return frontend.output_size(in_hw, size=(int(h), int(w)), name="The output",
                                        flag="size")
        except ValueError:
            raise DemoError(f"The output {int(h)} x {int(w)} (H x W) is smaller than the "
                            f"input {in_hw[0]} x {in_hw[1]}: MSIT only upsamples.") from None
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise DemoError(f"The scale must be a number, got {scale!r}.") from None
    if not SCALE_MIN <= s <= SCALE_MAX:  # also refuses NaN
        raise DemoError(f"The scale must be between {SCALE_MIN:g} and {SCALE_MAX:g}, "
                        f"got {s:g}.")
    return frontend.output_size(in_hw, s)


def plan(up: Any, in_hw: tuple[int, int], out_hw: tuple[int, int], max_memory_gb: float):
    """`up.plan` with the encoder tiled to fit max_memory_gb (as the CLI's --tile auto);
    DemoError, in the page's words, when the budget refuses the job (`budget.check`)."""
    try:
        # The decoder's chunk is checked once, when the server starts.
        return up.plan(in_hw, out_hw, tile="auto", max_memory_gb=max_memory_gb,
                       decoder=False)
    except budget.OverBudget as e:
        if e.part != "buffers":
            raise DemoError(public_message(e)) from None
        raise DemoError(f"The output {out_hw[0]} x {out_hw[1]} (H x W) needs ~"
                        f"{e.need / 2 ** 30:.2g} GB, over this demo's limit of "
                        f"{max_memory_gb:g} GB (--max_memory_gb): choose a smaller scale "
                        "or size.") from None


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds of one job, estimated from the pixel counts and four measured rates:

        encoder pixels x encode_s
        + per-query decoder (and every tiled job): output pixels x query_s
        + grid decoder: LR centres x centre_s + output pixels x grid_s

    The encoder (convolutions, windowed attention) costs the same per LR pixel; the
    tiled path encodes each window with its halo, so the overlap counts. The
    per-query decoder does the same work for every output pixel (it attends to the
    LR neighbours of each), in fixed-size chunks of queries, so a small output
    costs a whole chunk. The grid decoder computes keys and values once per LR centre
    for all the queries around it: at large scales it costs much less per output
    pixel (x30 ~10x less than x4 for the tiny test model), hence its two terms. The
    rates are measured on this machine, by `measure_cost` at start. JIT compilation
    at a new size is not included: the deadline checked at every decoded chunk
    covers it and any other miss of the estimate.
    """

    encode_s: float  # per encoder-window pixel
    query_s: float  # per output pixel, per-query decoder
    centre_s: float  # per LR pixel, grid decoder
    grid_s: float  # per output pixel, grid decoder
    chunk: int  # queries per decoder call

    def seconds(self, engine: Any, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> float:
        """The estimate for a call run as `engine` says (an `Upscaler.plan`: its tile,
        grid and model_cfg)."""
        lr_px, out_px = in_hw[0] * in_hw[1], max(out_hw[0] * out_hw[1], self.chunk)
        if engine.tile <= 0 or engine.tile >= max(in_hw):
            if engine.grid:
                return lr_px * (self.encode_s + self.centre_s) + out_px * self.grid_s
            return lr_px * self.encode_s + out_px * self.query_s
        halo = tiling.halo(engine.model_cfg)
        sides = [sum(hi - lo for lo, hi in (tiling.window(core, halo, n, engine.tile)
                                            for core in tiling.axis_tiles(n, engine.tile)))
                 for n in in_hw]
        return sides[0] * sides[1] * self.encode_s + out_px * self.query_s


def fit_grid(centres: int, runs: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(centre_s, grid_s) from two grid-decoder runs [(output pixels, seconds)] over the
    same `centres` LR pixels: seconds = centres x centre_s + pixels x grid_s, neither
    rate negative (timing noise)."""
    (p1, t1), (p2, t2) = runs[:2]
    grid = max((t2 - t1) / (p2 - p1), 0.0)
    centre = (t1 - grid * p1) / centres
    if centre < 0:
        centre, grid = 0.0, max(t1 / p1, t2 / p2)
    return centre, grid


def measure_cost(up: Any, lr_hw: tuple[int, int] = WARMUP_LR_HW) -> tuple[CostModel, float]:
    """Warm up `up` and measure its `CostModel` -> (cost, seconds the warm-up took).

    A random lr_hw input is encoded, then decoded to 4x x 2x (8 queries per LR pixel:
    the per-query decoder on CPU, two chunks at 32 x 32), 4x and 8x (16 and 64: the
    grid decoder, whose two rates these two give); each is run once to compile and
    once timed. With the decoder forced (from_pretrained's method), the missing
    rates are taken from the runs there are."""
    lr = np.random.default_rng(0).random((*lr_hw, 3), dtype=np.float32)
    lr_px = lr_hw[0] * lr_hw[1]
    t_start = time.perf_counter()

    def timed(fn: Callable[[], Any]) -> float:
        jax.block_until_ready(fn())  # compiles
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - t0

    encode = timed(lambda: up.encode(lr))
    runs: dict[bool, list[tuple[int, float]]] = {True: [], False: []}
    for sy, sx in ((4, 2), (4, 4), (8, 8)):
        hw = (lr_hw[0] * sy, lr_hw[1] * sx)
        seconds = timed(lambda: up(lr, size=hw, clamp=False, tile=0))
        runs[up.plan(lr_hw, hw, tile=0).grid].append((max(hw[0] * hw[1], up.chunk),
                                                      max(seconds - encode, 0.0)))
    query = [t / px for px, t in runs[False]]
    if len(runs[True]) >= 2:
        centre, grid = fit_grid(lr_px, runs[True][-2:])
    else:
        centre, grid = 0.0, max(query)
    cost = CostModel(encode_s=max(encode, 1e-6) / lr_px,
                     query_s=max(query[-1] if query else grid + centre / 16, 1e-9),
                     centre_s=centre, grid_s=max(grid, 1e-9), chunk=up.chunk)
    return cost, time.perf_counter() - t_start


def check_time(cost: Optional[CostModel], max_seconds: Optional[float], engine: Any,
               in_hw: tuple[int, int], out_hw: tuple[int, int]) -> Optional[float]:
    """The estimated seconds (None without a cost model); DemoError when over max_seconds."""
    if cost is None:
        return None
    est = cost.seconds(engine, in_hw, out_hw)
    if max_seconds and est > max_seconds:
        raise DemoError(f"The output {out_hw[0]} x {out_hw[1]} (H x W) would take about "
                        f"{est:.0f} s here, over this demo's limit of {max_seconds:g} s "
                        "(--max_seconds): choose a smaller scale or size.")
    return est


def upscale_pair(up: Any, image: Any, scale: float = 4.0, out_h: Optional[float] = None,
                 out_w: Optional[float] = None, *, max_memory_gb: float = 4.0,
                 progress: Progress = None, max_seconds: Optional[float] = None,
                 cost: Optional[CostModel] = None,
                 should_stop: Optional[Callable[[], bool]] = None,
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
    """MSIT and Pillow-bicubic upscales of one image to the same size.

    up: a `msit_jax.Upscaler`; image: (H, W, 3) uint8 RGB or a PIL image; the size is
    (out_h, out_w) when both are given, else round((H, W) * scale). Returns
    (sr, bicubic, info): sr and bicubic (out_h, out_w, 3) uint8, and info with
    'in_hw', 'out_hw' (H, W), 'seconds' (the MSIT call), 'bicubic_seconds',
    'tile' (0: the encoder ran on the whole image) and 'decoder'.
    The encoder is tiled as the CLI's `--tile auto` does, to stay within
    max_memory_gb. progress(done, total) is called per decoded chunk.

    Time: with a `cost` model, a job estimated over max_seconds is refused
    (DemoError) before it runs ('estimate' in info: the estimated seconds); with
    max_seconds, one still running after max_seconds is stopped at the next decoded
    chunk (DemoError), and one whose should_stop() turns true raises `Cancelled`
    there. The encoder of an untiled job and JIT compilation cannot be interrupted.
    """

    rgb = images.pil_to_rgb_uint8(image) if isinstance(image, Image.Image) else np.asarray(image)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3 or min(rgb.shape[:2]) < 1:
        raise DemoError(f"The image must be RGB uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}.")
    in_hw = (int(rgb.shape[0]), int(rgb.shape[1]))
    hw = output_hw(in_hw, scale, out_h, out_w)
    job = plan(up, in_hw, hw, max_memory_gb)
    estimate = check_time(cost, max_seconds, job, in_hw, hw)
    t0 = time.perf_counter()

    def on_chunk(done: int, total: int) -> None:
        if should_stop is not None and should_stop():
            raise Cancelled(f"after {done} of {total} chunks")
        elapsed = time.perf_counter() - t0
        if max_seconds and elapsed > max_seconds and done < total:
            raise DemoError(f"Stopped after {elapsed:.0f} s ({done} of {total} chunks): "
                            f"over this demo's limit of {max_seconds:g} s (--max_seconds). "
                            "Choose a smaller scale or size.")
        if progress:
            progress(done, total)

    watched = progress or max_seconds or should_stop is not None
    sr = up.upscale_array(images.to_float(rgb), hw, clamp=False, plan=job,
                          progress=on_chunk if watched else False)
    seconds = time.perf_counter() - t0
    try:
        frontend.check_finite(sr)
    except errors.NonFiniteError as e:
        raise DemoError(f"{e}: are the weights corrupt?") from None
    t0 = time.perf_counter()
    bicubic = images.resize_bicubic(rgb, hw)
    info = {"in_hw": in_hw, "out_hw": hw, "seconds": seconds,
            "bicubic_seconds": time.perf_counter() - t0, "tile": job.tile,
            "decoder": "grid" if job.grid else "query", "estimate": estimate}
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
    if info.get("estimate") is not None:
        lines[-1] += f" · estimated beforehand: {info['estimate']:.1f} s"
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


def client_gone() -> bool:
    """Whether gradio has let go of the event this thread runs (its page was closed, or
    it was cancelled); False outside a gradio event.

    gradio 6 keeps running a synchronous handler whose client left: a closed page
    only marks the event not alive, and /cancel (gradio_client's Job.cancel) cancels
    the asyncio task awaiting the thread, which drops the event from the running jobs
    and frees its concurrency slot. Both are seen here; queued events are simply
    removed by gradio and never start. Reads gradio internals (pinned: gradio==6.31.0,
    checked by tests/test_demo_load.py)."""
    try:
        from gradio.context import LocalContext

        blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
        if blocks is None or event_id is None or blocks._queue is None:
            return False
        for job in list(blocks._queue.active_jobs):
            for event in job or ():
                if event._id == event_id:
                    return not event.alive
    except Exception:  # noqa: BLE001 - another gradio: never cancel rather than always
        return False
    return True  # no longer running: its task was cancelled


def log(message: str) -> None:
    """One line on the server's stdout."""
    print(f"msit-jax demo: {message}", flush=True)


def make_handler(up: Any, out_dir: str, max_memory_gb: float, *,
                 max_seconds: Optional[float] = None, cost: Optional[CostModel] = None):
    """The click handler: (upload path, scale, out_h, out_w) -> the page's outputs
    (MSIT PNG, bicubic PNG, (bicubic, MSIT) for the slider, download path, info).

    Every failure reaches the page as a gr.Error with a message naming no server
    path (`public_message`); an unexpected one as INTERNAL_ERROR, its traceback in
    the server's log. Jobs hold a lock while they decode and upscale, so a job that
    gradio let go of (see `client_gone`) still finishing its chunk never overlaps
    the next one."""
    gr = import_gradio()
    lock = threading.Lock()

    def refuse(message: str) -> None:
        raise gr.Error(public_message(message), print_exception=False)

    def run(path: Optional[str], scale: float, out_h: Optional[float], out_w: Optional[float],
            progress=gr.Progress()):
        if not path:
            refuse("Upload an image first.")
        try:
            while not lock.acquire(timeout=0.25):
                if client_gone():
                    raise Cancelled("while waiting for the model")
            try:
                rgb, note = read_upload(path)
                progress(0.0, desc="encoding")
                sr, bic, info = upscale_pair(
                    up, rgb, scale, out_h, out_w, max_memory_gb=max_memory_gb,
                    max_seconds=max_seconds, cost=cost, should_stop=client_gone,
                    progress=lambda done, total: progress((done, total), desc="decoding",
                                                          unit="chunks"))
            finally:
                lock.release()
            stem = os.path.splitext(os.path.basename(path))[0][:64] or "image"
            sr_path, bic_path = save_results(out_dir, stem, sr, bic)
        except DemoError as e:
            log(f"refused: {public_message(e)}")
            refuse(str(e))
        except Cancelled as e:
            log(f"cancelled {e} (the client left or cancelled)")
            refuse(CANCELLED)
        except MemoryError:
            log("refused: out of memory")
            refuse("Out of memory: choose a smaller scale or size.")
        except Exception:  # noqa: BLE001 - the page gets no details, the log all of them
            log(f"internal error:\n{traceback.format_exc().rstrip()}")
            refuse(INTERNAL_ERROR)
        (h, w), (oh, ow) = info["in_hw"], info["out_hw"]
        estimate = "" if info["estimate"] is None else f" (estimated {info['estimate']:.2f} s)"
        log(f"{h} x {w} -> {oh} x {ow} (H x W) in {info['seconds']:.2f} s{estimate}")
        return sr_path, bic_path, (bic_path, sr_path), sr_path, format_info(info, note)

    return run


def build_app(up: Any, out_dir: str, *, max_memory_gb: float = 4.0,
              max_seconds: Optional[float] = None, cost: Optional[CostModel] = None):
    """The gradio Blocks page for the upscaler `up` (not launched); results go under out_dir.
    Gradio's copies of them are deleted an hour after they were made, and at shutdown.
    max_seconds, cost: the time limit (see `upscale_pair`)."""
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
        handler = make_handler(up, out_dir, max_memory_gb, max_seconds=max_seconds, cost=cost)
        go.click(handler, [inp, scale, out_h, out_w],
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


PROG = "msit-demo"
USAGE = f"usage: {PROG} [--checkpoint PATH] [flags]\n\n{__doc__}"


def define_flags(fv: flags.FlagValues) -> None:
    """The command's flags, on `fv` (a private FlagValues, see `msit_jax.flags_util`)."""
    flags.DEFINE_string("checkpoint", weights.DEFAULT, "Anything Upscaler.from_pretrained "
                        "reads (.pth, .safetensors, a msit-jax checkpoint or training workdir, "
                        f"a bundled model name: {', '.join(weights.available())}). Default: "
                        f"the bundled {weights.DEFAULT}.", flag_values=fv)
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (default: this machine "
                        "only; 0.0.0.0 serves every network the machine is on).",
                        flag_values=fv)
    flags.DEFINE_integer("port", 7860, "Port to listen on.", flag_values=fv)
    flags.DEFINE_float("max_memory_gb", 4.0, "Memory budget per request: larger outputs are "
                       "refused, and the encoder is tiled to fit.", flag_values=fv)
    flags.DEFINE_float("max_file_mb", 50.0, "Largest upload.", flag_values=fv)
    flags.DEFINE_integer("chunk", None, "HR pixels per decoder call.", flag_values=fv)
    flags.DEFINE_float("max_seconds", MAX_SECONDS, "Longest job: one estimated over it (from "
                       "a warm-up run at start) is refused, one running past it is stopped "
                       "at the next decoded chunk. 0: no limit and no warm-up.",
                       flag_values=fv)
    flags.DEFINE_integer("max_queue", MAX_QUEUE, "Most requests waiting for the model; "
                         "later ones are refused until one finishes.", flag_values=fv)
    flags_util.define_compile_cache(fv)
    flags_util.define_verbose(fv)


def _serve_checkpoint(fv: flags.FlagValues, positionals: Sequence[str]) -> int:
    """The command on parsed flags: serve the page until stopped; the exit status."""
    if positionals:
        return errors.report(errors.UsageError(
            f"unexpected arguments: {' '.join(positionals)} (see --help)"))
    if not fv.checkpoint:
        return errors.report(errors.UsageError(
            f"--checkpoint is empty: give a path, or leave it out for {weights.DEFAULT} "
            "(see --help)"))
    if fv.verbose:
        console.quiet_logs(verbose=True)  # the libraries' warnings, gradio's included
    else:
        quiet_logs()  # before gradio and JAX are imported
    try:
        import_gradio()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return errors.EXIT_USAGE

    if fv.max_seconds < 0 or fv.max_queue < 1:
        return errors.report(errors.UsageError(
            f"--max_seconds must be >= 0 and --max_queue >= 1, got {fv.max_seconds:g} and "
            f"{fv.max_queue}"))
    try:
        up = Upscaler.from_pretrained(fv.checkpoint, chunk=fv.chunk)
    except Exception as e:  # noqa: BLE001 - one line naming the checkpoint
        print(f"error: cannot load {fv.checkpoint}: {e}", file=sys.stderr)
        return errors.EXIT_FAILURE
    try:  # the decoder's chunk is the same for every job: checked once
        budget.check_decoder(up.model_cfg, up.chunk, fv.max_memory_gb,
                             f"--chunk {fv.chunk}" if fv.chunk else None)
    except errors.MsitError as e:
        return errors.report(e)
    cost = None
    if fv.max_seconds:
        cost, seconds = measure_cost(up)
        log(f"warm-up {seconds:.1f} s: about {cost.encode_s * 1e6:.3g} s per LR megapixel "
            f"encoded; decoded: {cost.query_s * 1e6:.3g} s per output megapixel (query "
            f"decoder), {cost.centre_s * 1e6:.3g} s per LR megapixel + "
            f"{cost.grid_s * 1e6:.3g} s per output megapixel (grid decoder)")
    # Results beside gradio's own files (GRADIO_TEMP_DIR when set), removed at exit.
    base = os.environ.get("GRADIO_TEMP_DIR") or None
    if base:
        os.makedirs(base, exist_ok=True)
    out_dir = tempfile.mkdtemp(prefix="msit-demo-", dir=base)
    try:
        app = build_app(up, out_dir, max_memory_gb=fv.max_memory_gb,
                        max_seconds=fv.max_seconds or None, cost=cost)
        return serve(app, fv)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


main = flags_util.entry_point(define_flags, _serve_checkpoint, USAGE, prog=PROG)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(app: Any, args: flags.FlagValues) -> int:
    """Launch the page, print where it listens, and block until Ctrl+C or SIGTERM."""
    # Every request through the queue (api_open=False: gradio would otherwise run
    # POST /gradio_api/run/upscale beside it), one at a time, at most max_queue waiting.
    app.queue(max_size=getattr(args, "max_queue", MAX_QUEUE), default_concurrency_limit=1,
              api_open=False)
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
