"""Benchmarks and reports of msit-jax, run from the repository root as
`python -m benchmarks.NAME` (e.g. `python -m benchmarks.lower --help`).

Not part of the installed package: they import `msit_jax` and each other
(`from benchmarks import flops`) from a checkout.
"""
