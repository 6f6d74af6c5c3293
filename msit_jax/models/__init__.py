"""The model: config, layers, encoders, MSNO, decoders, sampling, RIM folding.

Modules here import only each other, `msit_jax.ops` and `msit_jax.geometry`
(tests/test_layout.py checks it), so the architecture reads on its own.
"""
