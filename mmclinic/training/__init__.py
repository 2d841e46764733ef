"""Training: the loop (checkpoints, lineage, tracking), the training step unit, losses and the
optimizer."""
