"""PyTorch helpers: persistent pickles, distributed set-up, training statistics."""
