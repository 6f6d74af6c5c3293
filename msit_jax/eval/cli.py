r"""Evaluate MSIT (or the bicubic baseline) with the reference's protocol: `evaluate.py`,
`msit-evaluate`.

    python evaluate.py --checkpoint epoch-best.pth --data set5 --data set14 \
        --data_root ~/sr-data --scales 2,3,4,6,8 --json results.json
    python evaluate.py --model bicubic --data data/Set5 --scales 2,3,4,6,8
    python evaluate.py --model msit-lite --data set5 --data_root ~/sr-data --scales 2,3,4
                                                 # the bundled weights (= --checkpoint msit-lite)
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

from absl import flags

from msit_jax import console, errors, flags_util, weights
from msit_jax.eval import reports, runner
from msit_jax.eval.datasets import BENCHMARK_FLAGS, DATA_ENV
from msit_jax.eval.predictors import MODELS
from msit_jax.eval.protocol import DEGRADATIONS, LR_SOURCES

PROG = "msit-evaluate"
USAGE = (f"usage: {PROG} (--checkpoint PATH | --model bicubic | --model msit-lite) --data DATA "
         f"[flags]\n\n{__doc__}")

def define_flags(fv: flags.FlagValues) -> None:
    """The command's flags, on `fv` (a private FlagValues, see `msit_jax.flags_util`)."""
    flags.DEFINE_string("checkpoint", None, "msit-jax checkpoint dir (e.g. runs/edsr_s1) or "
                        "official MSIT .pth.", flag_values=fv)
    flags.DEFINE_enum(
        "model", None, list(MODELS) + weights.available(),
        "What to evaluate: 'msit' (default with --checkpoint), 'bicubic' (bicubic upsampling "
        "of the uint8 LR with the --degradation kernel), 'bicubic_y' (the published tables' "
        "Y-only MATLAB bicubic; needs --protocol matlab --degradation matlab), or a bundled "
        f"model ({', '.join(weights.available())}: MSIT with those weights, as --checkpoint "
        "NAME).",
        flag_values=fv)
    flags.DEFINE_multi_string(
        "data", None, f"A benchmark name ({', '.join(BENCHMARK_FLAGS)}; looked up under "
        f"--data_root or ${DATA_ENV}, e.g. --data set5 --data_root ~/sr-data), an HR image "
        "folder (e.g. --data data/Set5; a folder holding HR/ and LR_bicubic/X{s}/ works too), "
        "NAME=PATH, or tfds:NAME[:SPLIT]; repeat or comma-separate for several.",
        flag_values=fv)
    flags.DEFINE_string(
        "data_root", None, f"Folder holding the benchmark sets named by --data (Set5/, "
        f"Set14/, B100/, Urban100/, DIV2K/DIV2K_valid_HR/; see docs/evaluation.md). Default: "
        f"${DATA_ENV}, else ./data.", flag_values=fv)
    flags.DEFINE_list("scales", "2,3,4,6,8,12,18,24,30", "Scale factors (any floats >= 1).",
                      flag_values=fv)
    flags.DEFINE_list("protocol", "auto", "Scoring preset per dataset (one for all, or one per "
                      "--data): auto (reference default: div2k for DIV2K, else benchmark), "
                      "benchmark (Y, shave s), div2k (RGB, shave s+6), matlab (uint8, rounded "
                      "MATLAB Y, shave s).", flag_values=fv)
    flags.DEFINE_enum("lr_source", "auto", list(LR_SOURCES),
                      "LR images: auto (the reference's choice: LR_bicubic/X{s} files for "
                      "Set14 and B100 at x2-x4, else made on the fly), paired, downsample.",
                      flag_values=fv)
    flags.DEFINE_enum("degradation", "pillow", list(DEGRADATIONS),
                      "LR maker on the fly: pillow (reference) or matlab (MATLAB bicubic "
                      "imresize, as the benchmark LR files were made).", flag_values=fv)
    flags.DEFINE_bool("fold", True, "Fold RIMs and BatchNorms first (faster; float round-off "
                      "differences from the reference); --nofold runs the model as stored.",
                      flag_values=fv)
    flags.DEFINE_integer("chunk", 0, "Queries per decoder call (memory vs. speed; 0: 4096 on "
                         "CPU, 16384 on GPU/TPU).", flag_values=fv)
    flags_util.define_execution_flags(fv)
    flags.DEFINE_bool("self_ensemble", False, "Geometric self-ensemble: score the mean of the "
                      "predictions for the 8 flips/transposes of each input (rows marked '+', "
                      "as EDSR+). 8x the work and time of a plain evaluation.", flag_values=fv)
    flags.DEFINE_bool("with_bicubic", False, "Also score the bicubic baseline (implied by "
                      "--plot).", flag_values=fv)
    flags.DEFINE_string("json", None, "Write {dataset: {scale: {psnr, ssim, per_image}}} here "
                        "(sizes as [H, W]).", flag_values=fv)
    flags.DEFINE_string("save_images", None, "Save predictions as DIR/dataset/x{s}/name.png.",
                        flag_values=fv)
    flags.DEFINE_string("plot", None, "Save a PSNR-vs-scale plot (first dataset, with "
                        "bicubic); needs matplotlib (pip install \"msit-jax[plot]\").",
                        flag_values=fv)
    flags.DEFINE_string("tfds_data_dir", None, "data_dir for tfds: datasets.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show progress bars (--noprogress: none).",
                      flag_values=fv)
    flags_util.define_verbose(fv)
    flags_util.define_compile_cache(fv)


METHOD_NAMES = {"msit": "MSIT", "bicubic": "Bicubic", "bicubic_y": "Bicubic (Y, MATLAB)"}


def config_from_flags(fv: flags.FlagValues):
    """The evaluation config (`runner.default_config`) from the parsed flags; UsageError for
    flag values that cannot work."""

    cfg = runner.default_config()
    model = fv.model or ("msit" if fv.checkpoint else None)
    checkpoint = fv.checkpoint or ""
    if model is not None and weights.is_bundled(model):
        if fv.checkpoint:
            raise errors.UsageError(f"--model {model} is the bundled model; give it or "
                                    "--checkpoint, not both")
        model, checkpoint = "msit", model
    if model is None:
        raise errors.UsageError("give --checkpoint (MSIT) or --model bicubic")
    if model != "msit" and fv.checkpoint:
        raise errors.UsageError(f"--checkpoint is only used with --model msit, not {model}")
    if not fv.data:
        raise errors.UsageError("give at least one --data (e.g. --data set5 --data_root "
                                "~/sr-data, or --data data/Set5)")
    try:
        scales = [float(s) for s in fv.scales]
    except ValueError:
        raise errors.UsageError(f"--scales must be numbers, got {','.join(fv.scales)}") \
            from None
    if not scales or not all(math.isfinite(s) and s >= 1 for s in scales):
        raise errors.UsageError(f"--scales must be finite numbers >= 1, got "
                                f"{','.join(fv.scales)}")
    if fv.chunk < 0:
        raise errors.UsageError(f"--chunk must be >= 0 (0: per platform), got {fv.chunk}")
    cfg.model = model
    cfg.checkpoint = checkpoint
    cfg.data = [d for spec in fv.data for d in spec.split(",") if d]
    cfg.data_root = fv.data_root or ""
    cfg.scales = scales
    cfg.protocol = list(fv.protocol)
    cfg.lr_source = fv.lr_source
    cfg.degradation = fv.degradation
    cfg.fold = fv.fold
    cfg.chunk = fv.chunk
    cfg.method = fv.decoder
    cfg.dtype = fv.dtype
    cfg.precision = fv.precision
    cfg.fft_min_kernel = fv.fft_min_kernel
    cfg.with_bicubic = fv.with_bicubic
    if fv.self_ensemble and model != "msit":
        raise errors.UsageError(f"--self_ensemble needs an MSIT model, not --model {model}")
    cfg.self_ensemble = fv.self_ensemble
    cfg.json = fv.json or ""
    cfg.save_images = fv.save_images or ""
    cfg.plot = fv.plot or ""
    cfg.tfds_data_dir = fv.tfds_data_dir or ""
    cfg.progress = fv.progress
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


def evaluate(fv: flags.FlagValues, positionals: Sequence[str]) -> int:
    """The command on parsed flags: the exit status."""
    if positionals:
        return errors.report(errors.UsageError(
            f"unexpected arguments: {' '.join(positionals)} (see --help)"))
    console.quiet_logs(fv.verbose)  # before Orbax / JAX / TFDS are imported
    try:

        cfg = config_from_flags(fv)
        with _plain_logs():
            results, baseline, failures = runner.run(cfg, verbose_progress=True)
    except Exception as e:  # noqa: BLE001 - one line, see msit_jax.errors
        return errors.report(e, fv.verbose)
    name = METHOD_NAMES[cfg.model] + ("+" if cfg.self_ensemble else "")
    rows = [(name, results)] + ([("Bicubic", baseline)] if baseline else [])
    print(reports.markdown_table(rows, [float(s) for s in cfg.scales]), flush=True)
    console.note_compile_cache()
    if failures:
        print(f"error: {len(failures)} image evaluation(s) or output(s) failed:",
              file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        codes = {getattr(f, "exit_code", errors.EXIT_FAILURE) for f in failures}
        return codes.pop() if len(codes) == 1 else errors.EXIT_FAILURE
    return errors.EXIT_OK


main = flags_util.entry_point(define_flags, evaluate, USAGE, prog=PROG)


if __name__ == "__main__":
    main()
