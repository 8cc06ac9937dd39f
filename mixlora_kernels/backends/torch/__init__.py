"""The PyTorch backend: the fused expert pass in PyTorch ops, forward and backward."""
