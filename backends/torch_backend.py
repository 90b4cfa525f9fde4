"""The torch backend (CPU and CUDA tensors). Filled in by the sparse-training work."""
