"""msit_jax.errors: distinct exit codes and one-line messages."""

from __future__ import annotations

from msit_jax import errors, images


def test_exit_codes_are_distinct():
    codes = [errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_USAGE, errors.EXIT_CONFIG,
             errors.EXIT_INPUT, errors.EXIT_CHECKPOINT, errors.EXIT_NONFINITE, errors.EXIT_OUTPUT,
             errors.EXIT_RESOURCE]
    assert len(set(codes)) == len(codes)
    assert errors.exit_code_for(images.ImageTooLargeError("x")) == errors.EXIT_RESOURCE
    assert errors.exit_code_for(OSError(28, "No space left on device")) == errors.EXIT_OUTPUT
    assert errors.exit_code_for(FileNotFoundError("x")) == errors.EXIT_INPUT
    assert errors.one_line("a\n  b\n\nc") == "a; b; c"
