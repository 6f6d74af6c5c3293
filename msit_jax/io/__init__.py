"""Weights in and out: the official state_dict mapping, `.pth` / checkpoint
loading, model checkpoints and conversion. Nothing here imports `training`."""
