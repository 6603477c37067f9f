"""Training: the loop, distributed training, evaluation, metrics, checkpoints, runs."""
