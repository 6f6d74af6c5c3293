r"""Evaluate MSIT (or the bicubic baseline) with the reference's protocol: `evaluate.py`,
`msit-evaluate`.

    python evaluate.py --checkpoint epoch-best.pth --data set5 --data set14 \
        --data_root ~/sr-data --scales 2,3,4,6,8 --json results.json
    python evaluate.py --model bicubic --data data/Set5 --scales 2,3,4,6,8
    python evaluate.py --model bicubic_y --degradation matlab --protocol matlab \
        --data data/Set5 --scales 2,3,4          # the published tables' bicubic rows
    MSIT_DATA=~/sr-data python evaluate.py --checkpoint runs/edsr_s1 --data set5 \
        --scales 1.5,2,3,4,6,8,12,18,24,30 --plot psnr_vs_scale.png

Prints a Markdown table (methods x datasets, scales as columns, "PSNR / SSIM")
on stdout; stage timings (load, fold), a line per (dataset, scale) with the
time per image (and the JIT compilation of the first image of each size), a
progress bar with per-image figures, and the paths written go to stderr;
per-image figures also go to --json. Third-party INFO/WARNING logs are shown
with --verbose only. Output paths (and matplotlib for --plot) are checked before
the evaluation starts, and the table is printed even when a later write fails.
Errors are one line with the exit codes of `msit_jax.errors`: 1 if images
failed for different reasons (otherwise the code of their cause, e.g. 6 for a
non-finite model output, 4 for unreadable files or a missing dataset), 2 for
flags, 5 for the checkpoint, 7 for outputs; --verbose adds tracebacks.
Protocol: `msit_jax.eval.protocol` and docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from typing import Iterator, Sequence

from absl import app, flags

from msit_jax import console, errors, flags_util
from msit_jax.eval.datasets import BENCHMARK_FLAGS, DATA_ENV
from msit_jax.eval.predictors import MODELS
from msit_jax.eval.protocol import DEGRADATIONS, LR_SOURCES

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "msit-jax checkpoint dir (e.g. runs/edsr_s1) or "
                    "official MSIT .pth.")
flags.DEFINE_enum("model", None, list(MODELS),
                  "What to evaluate: 'msit' (default with --checkpoint), 'bicubic' (bicubic "
                  "upsampling of the uint8 LR with the --degradation kernel), 'bicubic_y' (the "
                  "published tables' Y-only MATLAB bicubic; needs --protocol matlab "
                  "--degradation matlab).")
flags.DEFINE_multi_string(
    "data", None, f"A benchmark name ({', '.join(BENCHMARK_FLAGS)}; looked up under "
    f"--data_root or ${DATA_ENV}, e.g. --data set5 --data_root ~/sr-data), an HR image folder "
    "(e.g. --data data/Set5; a folder holding HR/ and LR_bicubic/X{s}/ works too), NAME=PATH, "
    "or tfds:NAME[:SPLIT]; repeat or comma-separate for several.")
flags.DEFINE_string("data_root", None, f"Folder holding the benchmark sets named by --data "
                    f"(Set5/, Set14/, B100/, Urban100/, DIV2K/DIV2K_valid_HR/; see "
                    f"docs/evaluation.md). Default: ${DATA_ENV}, else ./data.")
flags.DEFINE_list("scales", "2,3,4,6,8,12,18,24,30", "Scale factors (any floats >= 1).")
flags.DEFINE_list("protocol", "auto", "Scoring preset per dataset (one for all, or one per "
                  "--data): auto (reference default: div2k for DIV2K, else benchmark), "
                  "benchmark (Y, shave s), div2k (RGB, shave s+6), matlab (uint8, rounded "
                  "MATLAB Y, shave s).")
flags.DEFINE_enum("lr_source", "auto", list(LR_SOURCES),
                  "LR images: auto (the reference's choice: LR_bicubic/X{s} files for Set14 "
                  "and B100 at x2-x4, else made on the fly), paired, downsample.")
flags.DEFINE_enum("degradation", "pillow", list(DEGRADATIONS),
                  "LR maker on the fly: pillow (reference) or matlab (MATLAB bicubic imresize, "
                  "as the benchmark LR files were made).")
flags.DEFINE_bool("fold", True, "Fold RIMs and BatchNorms first (faster; float round-off "
                  "differences from the reference); --nofold runs the model as stored.")
flags.DEFINE_integer("chunk", 0, "Queries per decoder call (memory vs. speed; 0: 4096 on "
                     "CPU, 16384 on GPU/TPU).")
flags.DEFINE_enum("decoder", "auto", ["auto", "grid", "query"], "Decoder formulation: grid "
                  "(queries grouped by LR centre, fast at large scales), query (the reference's "
                  "per-query form) or auto: grid from msit_jax.inference.grid_min_queries() "
                  "output pixels per input pixel, a per-platform threshold (9, i.e. x3, on "
                  "CPU; 4, i.e. x2, on GPU/TPU); equal to float32 round-off.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype; bfloat16 keeps "
                  "float32 parameters and accumulation.")
flags.DEFINE_enum("precision", "highest", ["highest", "high", "default"], "Matmul/conv "
                  "precision: highest (float32, the reference numerics), high or default "
                  "(TF32 / bf16 passes on GPU and TPU).")
flags.DEFINE_integer("fft_min_kernel", -1, "Multi-scale convs with kernels at least this large "
                     "run as FFT products; 0 never; -1 per platform (17 on CPU, never on "
                     "GPU/TPU).")
flags.DEFINE_bool("with_bicubic", False, "Also score the bicubic baseline (implied by --plot).")
flags.DEFINE_string("json", None, "Write {dataset: {scale: {psnr, ssim, per_image}}} here "
                    "(sizes as [H, W]).")
flags.DEFINE_string("save_images", None, "Save predictions as DIR/dataset/x{s}/name.png.")
flags.DEFINE_string("plot", None, "Save a PSNR-vs-scale plot (first dataset, with bicubic); "
                    "needs matplotlib (pip install -r requirements-plot.txt).")
flags.DEFINE_string("tfds_data_dir", None, "data_dir for tfds: datasets.")
flags.DEFINE_bool("progress", True, "Show progress bars (--noprogress: none).")
VERBOSE = flags_util.define_verbose()

METHOD_NAMES = {"msit": "MSIT", "bicubic": "Bicubic", "bicubic_y": "Bicubic (Y, MATLAB)"}


def config_from_flags():
    """The evaluation config (`runner.default_config`) from the parsed flags; UsageError for
    flag values that cannot work."""
    from msit_jax.eval import runner

    cfg = runner.default_config()
    model = FLAGS.model or ("msit" if FLAGS.checkpoint else None)
    if model is None:
        raise errors.UsageError("give --checkpoint (MSIT) or --model bicubic")
    if model != "msit" and FLAGS.checkpoint:
        raise errors.UsageError(f"--checkpoint is only used with --model msit, not {model}")
    if not FLAGS.data:
        raise errors.UsageError("give at least one --data (e.g. --data set5 --data_root "
                                "~/sr-data, or --data data/Set5)")
    try:
        scales = [float(s) for s in FLAGS.scales]
    except ValueError:
        raise errors.UsageError(f"--scales must be numbers, got {','.join(FLAGS.scales)}") \
            from None
    if not scales or not all(math.isfinite(s) and s >= 1 for s in scales):
        raise errors.UsageError(f"--scales must be finite numbers >= 1, got "
                                f"{','.join(FLAGS.scales)}")
    if FLAGS.chunk < 0:
        raise errors.UsageError(f"--chunk must be >= 0 (0: per platform), got {FLAGS.chunk}")
    cfg.model = model
    cfg.checkpoint = FLAGS.checkpoint or ""
    cfg.data = [d for spec in FLAGS.data for d in spec.split(",") if d]
    cfg.data_root = FLAGS.data_root or ""
    cfg.scales = scales
    cfg.protocol = list(FLAGS.protocol)
    cfg.lr_source = FLAGS.lr_source
    cfg.degradation = FLAGS.degradation
    cfg.fold = FLAGS.fold
    cfg.chunk = FLAGS.chunk
    cfg.method = FLAGS.decoder
    cfg.dtype = FLAGS.dtype
    cfg.precision = FLAGS.precision
    cfg.fft_min_kernel = FLAGS.fft_min_kernel
    cfg.with_bicubic = FLAGS.with_bicubic
    cfg.json = FLAGS.json or ""
    cfg.save_images = FLAGS.save_images or ""
    cfg.plot = FLAGS.plot or ""
    cfg.tfds_data_dir = FLAGS.tfds_data_dir or ""
    cfg.progress = FLAGS.progress
    return cfg


class _PlainFormatter(logging.Formatter):
    """'warning: ...' / 'error: ...' lines, as the rest of the command prints them."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


@contextlib.contextmanager
def _plain_logs() -> Iterator[None]:
    """Our own log records (msit_jax.*) as plain stderr lines instead of absl's
    'W1128 11:12:52.870919 ... runner.py:100]' prefix; restored afterwards."""
    logger = logging.getLogger("msit_jax")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PlainFormatter())
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def evaluate_main(argv: Sequence[str]) -> int:
    """The command after flag parsing (absl's `main(argv)`): the exit status."""
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return errors.EXIT_USAGE
    console.quiet_logs(FLAGS.verbose)  # before Orbax / JAX / TFDS are imported
    try:
        from msit_jax.eval import reports, runner

        cfg = config_from_flags()
        with _plain_logs():
            results, baseline, failures = runner.run(cfg, verbose_progress=True)
    except Exception as e:  # noqa: BLE001 - one line, see msit_jax.errors
        return errors.report(e, FLAGS.verbose)
    rows = [(METHOD_NAMES[cfg.model], results)] + ([("Bicubic", baseline)] if baseline else [])
    print(reports.markdown_table(rows, [float(s) for s in cfg.scales]), flush=True)
    if failures:
        print(f"error: {len(failures)} image evaluation(s) or output(s) failed:",
              file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        codes = {getattr(f, "exit_code", errors.EXIT_FAILURE) for f in failures}
        return codes.pop() if len(codes) == 1 else errors.EXIT_FAILURE
    return errors.EXIT_OK


def run_command(argv: Sequence[str]) -> int:
    """Parse `argv` (argv[0]: the program name) and evaluate, in this process: the exit
    status. The flags are reset afterwards (tests call it repeatedly)."""
    try:
        rest = flags_util.parse(argv)
    except errors.UsageError as e:
        return errors.report(e)
    try:
        return evaluate_main(rest)
    finally:
        FLAGS.unparse_flags()


def main() -> None:
    """Console-script entry point (`msit-evaluate`, `python evaluate.py`): sys.argv."""
    # absl's --help lists the key flags of the program file (sys.argv[0]); ours are
    # defined in this library module, so they are declared key flags of the program.
    for flag in FLAGS.get_flags_for_module(__name__) + [FLAGS[VERBOSE.name]]:
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(evaluate_main, flags_parser=flags_util.parse_or_exit)


if __name__ == "__main__":
    main()
