"""Generic flows over any app spec: train, evaluate, register, promote, batch-score."""
