"""What every model in this repo shares: train loop, optimiser, sharding, checkpoints, metrics."""
