"""Convert an official MSIT `.pth` into this project's checkpoint directory.

    python -m msit_jax.convert epoch-best.pth converted/msit_edsr
    python -m msit_jax.convert bare_state_dict.pth out/ --encoder rdn --conv rim
    python -m msit_jax.convert epoch-best.pth out_folded/ --fold

The result loads with `msit_jax.io.pretrained.load(DST_DIR)`. Errors are one line
naming the file, with the exit codes of `msit_jax.errors` (--verbose: traceback).
"""

from __future__ import annotations

import argparse
import sys

from msit_jax import errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msit_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="official training checkpoint or state_dict (.pth)")
    p.add_argument("dst", help="output directory (must not already hold a checkpoint)")
    p.add_argument("--encoder", choices=("edsr-baseline", "rdn"),
                   help="architecture of a bare state_dict (training checkpoints carry it)")
    p.add_argument("--conv", choices=("rim", "plain"),
                   help="layout of a bare state_dict (default: detected from its keys)")
    p.add_argument("--fold", action="store_true",
                   help="store the re-parameterised (RIM + BatchNorm folded) model")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of errors")
    args = p.parse_args(argv)
    try:
        return _convert(args)
    except Exception as e:  # noqa: BLE001 - one line per error, see msit_jax.errors
        return errors.report(e, args.verbose)


def _convert(args: argparse.Namespace) -> int:
    from msit_jax.io import checkpoint, pretrained
    from msit_jax.models import reparam
    from msit_jax.models.config import model_config

    cfg = None
    if args.encoder:
        conv = args.conv
        if conv is None:
            from msit_jax.io.torch_io import detect_conv_kind

            sd = pretrained.official_state_dict(pretrained.read_pth(args.src), args.src)
            conv = detect_conv_kind(sd)
        cfg = model_config(args.encoder, conv)
    cfg, variables = pretrained.load(args.src, cfg)
    if args.fold:
        cfg, variables = reparam.fold(cfg, variables)
    path = checkpoint.save_model(args.dst, cfg, variables)
    print(f"wrote {path} (encoder={cfg.encoder}, conv={cfg.conv}, batch_norm={cfg.batch_norm}, "
          f"{reparam.count_params(variables):,} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
