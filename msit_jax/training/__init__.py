"""Training: train state, LR schedule, sharded train step, checkpoints, stage-2 init,
metrics, evaluation, and the loop (`train_and_evaluate`)."""

from msit_jax.training.loop import TrainResult, train_and_evaluate

__all__ = ["TrainResult", "train_and_evaluate"]
