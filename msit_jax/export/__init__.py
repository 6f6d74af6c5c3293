"""Exports of a trained model and their runners.

    cli         msit-export (`python -m msit_jax.export`): stablehlo, onnx, pth, safetensors
    stablehlo   the StableHLO artifact runner (`load(folder)`; JAX only, no Flax)
    onnx_graph  the ONNX graph builder and its onnxruntime runner

Submodules are imported on first use: a runner never imports the exporter.
"""
