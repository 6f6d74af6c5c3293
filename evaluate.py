r"""Evaluate MSIT (or the bicubic baseline) with the reference's protocol.

    python evaluate.py --checkpoint epoch-best.pth --data ../data/Set5 --data ../data/Set14 \
        --scales 2,3,4,6,8 --json results.json
    python evaluate.py --model bicubic --data ../data/Set5 --scales 2,3,4,6,8
    python evaluate.py --model bicubic_y --degradation matlab --protocol matlab \
        --data ../data/Set5 --scales 2,3,4          # the published tables' bicubic rows
    python evaluate.py --checkpoint ckpt/ --data ../data/Set5 \
        --scales 1.5,2,3,4,6,8,12,18,24,30 --plot psnr_vs_scale.png

Prints a Markdown table (methods x datasets, scales as columns, "PSNR / SSIM")
on stdout; per-image figures and wall times go to the log (stderr) and to
--json. Output paths are checked writable before the evaluation starts, and
the table is printed even when a later write fails. Errors are one line with
the exit codes of `msit_jax.errors`: 1 if images failed for different reasons
(otherwise the code of their cause, e.g. 6 for a non-finite model output, 4 for
unreadable files), 2 for flags, 5 for the checkpoint, 7 for outputs;
--verbose adds tracebacks. The protocol is documented in
`msit_jax/eval/evaluation.py` and docs/evaluation.md.
"""

from __future__ import annotations

import logging
import math
import sys

from absl import app, flags

from msit_jax import errors
from msit_jax.eval import evaluation

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "msit-jax checkpoint dir or official MSIT .pth.")
flags.DEFINE_enum("model", None, list(evaluation.MODELS),
                  "What to evaluate: 'msit' (default with --checkpoint), 'bicubic' (bicubic "
                  "upsampling of the uint8 LR with the --degradation kernel), 'bicubic_y' (the "
                  "published tables' Y-only MATLAB bicubic; needs --protocol matlab "
                  "--degradation matlab).")
flags.DEFINE_multi_string("data", None, "HR image folder (a folder with HR/ and LR_bicubic/ "
                          "works too), NAME=PATH, or tfds:NAME[:SPLIT]; repeat or "
                          "comma-separate for several.")
flags.DEFINE_list("scales", "2,3,4,6,8,12,18,24,30", "Scale factors (any floats >= 1).")
flags.DEFINE_list("protocol", "auto", "Scoring preset per dataset (one for all, or one per "
                  "--data): auto (reference default: div2k for DIV2K, else benchmark), "
                  "benchmark (Y, shave s), div2k (RGB, shave s+6), matlab (uint8, rounded "
                  "MATLAB Y, shave s).")
flags.DEFINE_enum("lr_source", "auto", list(evaluation.LR_SOURCES),
                  "LR images: auto (the reference's choice: LR_bicubic/X{s} files for Set14 "
                  "and B100 at x2-x4, else made on the fly), paired, downsample.")
flags.DEFINE_enum("degradation", "pillow", list(evaluation.DEGRADATIONS),
                  "LR maker on the fly: pillow (reference) or matlab (MATLAB bicubic imresize, "
                  "as the benchmark LR files were made).")
flags.DEFINE_bool("fold", True, "Fold RIMs and BatchNorms first (faster; float round-off "
                  "differences from the reference).")
flags.DEFINE_integer("chunk", 0, "Queries per decoder call (memory vs. speed; 0: 4096 on "
                     "CPU, 16384 on GPU/TPU).")
flags.DEFINE_enum("decoder", "auto", ["auto", "grid", "query"], "Decoder formulation: grid "
                  "(queries grouped by LR centre, fast at large scales), query (the reference's "
                  "per-query form) or auto (grid from 9 output pixels per input pixel, x3, on "
                  "CPU; from 4 on GPU/TPU); equal to float32 round-off.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype; bfloat16 keeps "
                  "float32 parameters and accumulation.")
flags.DEFINE_enum("precision", "highest", ["highest", "high", "default"], "Matmul/conv "
                  "precision: highest (float32, the reference numerics), high or default "
                  "(TF32 / bf16 passes on GPU and TPU).")
flags.DEFINE_integer("fft_min_kernel", -1, "Multi-scale convs with kernels at least this large "
                     "run as FFT products; 0 never; -1 per platform (17 on CPU, never on "
                     "GPU/TPU).")
flags.DEFINE_bool("with_bicubic", False, "Also score the bicubic baseline (implied by --plot).")
flags.DEFINE_string("json", None, "Write {dataset: {scale: {psnr, ssim, per_image}}} here.")
flags.DEFINE_string("save_images", None, "Save predictions as DIR/dataset/x{s}/name.png.")
flags.DEFINE_string("plot", None, "Save a PSNR-vs-scale plot (first dataset, with bicubic); "
                    "needs matplotlib (requirements-plot.txt).")
flags.DEFINE_string("tfds_data_dir", None, "data_dir for tfds: datasets.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_bool("verbose", False, "Print the traceback of an error.")


def config_from_flags() -> evaluation.ml_collections.ConfigDict:
    cfg = evaluation.default_config()
    model = FLAGS.model or ("msit" if FLAGS.checkpoint else None)
    if model is None:
        raise errors.UsageError("give --checkpoint (MSIT) or --model bicubic")
    if model != "msit" and FLAGS.checkpoint:
        raise errors.UsageError(f"--checkpoint is only used with --model msit, not {model}")
    if not FLAGS.data:
        raise errors.UsageError("give at least one --data folder")
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


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (exit 2)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {errors.one_line(str(e))}", file=sys.stderr)
        sys.exit(errors.EXIT_USAGE)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return errors.EXIT_USAGE
    logging.getLogger("msit_jax").setLevel(logging.INFO)
    logging.getLogger("jax").setLevel(logging.WARNING)  # backend probing noise
    try:
        cfg = config_from_flags()
        results, baseline, failures = evaluation.run(cfg)
    except Exception as e:  # noqa: BLE001 - one line, see msit_jax.errors
        return errors.report(e, FLAGS.verbose)
    name = {"msit": "MSIT", "bicubic": "Bicubic", "bicubic_y": "Bicubic (Y, MATLAB)"}[cfg.model]
    rows = [(name, results)] + ([("Bicubic", baseline)] if baseline else [])
    print(evaluation.markdown_table(rows, [float(s) for s in cfg.scales]), flush=True)
    if failures:
        print(f"error: {len(failures)} image evaluation(s) or output(s) failed:",
              file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        codes = {getattr(f, "exit_code", errors.EXIT_FAILURE) for f in failures}
        return codes.pop() if len(codes) == 1 else errors.EXIT_FAILURE
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
