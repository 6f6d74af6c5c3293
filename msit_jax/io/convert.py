"""Convert an official MSIT `.pth` into this project's checkpoint directory.

    python -m msit_jax.convert epoch-best.pth converted/msit_edsr
    python -m msit_jax.convert bare_state_dict.pth out/ --encoder rdn --conv rim
    python -m msit_jax.convert epoch-best.pth out_folded/ --fold

The result loads with `msit_jax.io.pretrained.load(DST_DIR)`. Progress (timed
stages: load checkpoint, fold, write) goes to stderr, the written path to
stdout; --quiet leaves only errors. Errors are one line naming the file, with
the exit codes of `msit_jax.errors`; --verbose adds tracebacks and third-party
logs. Flags are absl flags: booleans are --fold / --nofold.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

from msit_jax import console, errors, flags_util
from msit_jax.io import model_dir, pretrained
from msit_jax.io.torch_io import detect_conv_kind
from msit_jax.models import reparam
from msit_jax.models.config import model_config

PROG = "python -m msit_jax.convert"
USAGE = f"usage: {PROG} [flags] SRC DST\n\n{__doc__}"


def define_flags(fv: flags.FlagValues) -> None:
    """The command's flags, on `fv` (a private FlagValues, see `msit_jax.flags_util`)."""
    flags.DEFINE_enum("encoder", None, ["edsr-baseline", "rdn"], "Architecture of a bare "
                      "state_dict (training checkpoints carry it).", flag_values=fv)
    flags.DEFINE_enum("conv", None, ["rim", "plain"], "Layout of a bare state_dict "
                      "(default: detected from its keys).", flag_values=fv)
    flags.DEFINE_bool("fold", False, "Store the re-parameterised (RIM + BatchNorm folded) "
                      "model.", flag_values=fv)
    flags.DEFINE_bool("quiet", False, "Print only errors and the written path (no stages).",
                      flag_values=fv)
    flags_util.define_verbose(fv)


def _convert(f: flags.FlagValues, positionals: Sequence[str]) -> int:
    """The command on parsed flags: SRC DST -> the exit status."""
    console.quiet_logs(f.verbose)
    try:
        if len(positionals) != 2:
            raise errors.UsageError(
                f"give SRC (.pth) and DST (a new directory), got {len(positionals)} "
                f"argument(s){': ' + ' '.join(positionals) if positionals else ''} "
                "(see --help)")
        return _write(f, *positionals)
    except Exception as e:  # noqa: BLE001 - one line per error, see msit_jax.errors
        return errors.report(e, f.verbose)


def _write(f: flags.FlagValues, src: str, dst: str) -> int:

    quiet = f.quiet
    with console.stage("load checkpoint", quiet=quiet):
        cfg = None
        if f.encoder:
            conv = f.conv
            if conv is None:

                sd = pretrained.official_state_dict(pretrained.read_pth(src), src)
                conv = detect_conv_kind(sd)
            cfg = model_config(f.encoder, conv)
        cfg, variables = pretrained.load(src, cfg)
    if f.fold:
        with console.stage("fold", quiet=quiet):
            cfg, variables = reparam.fold(cfg, variables)
    with console.stage("write", quiet=quiet):
        path = model_dir.save_model(dst, cfg, variables)
    print(f"wrote {path} (encoder={cfg.encoder}, conv={cfg.conv}, batch_norm={cfg.batch_norm}, "
          f"{reparam.count_params(variables):,} values)")
    return 0


main = flags_util.entry_point(define_flags, _convert, USAGE)


if __name__ == "__main__":
    sys.exit(main())
