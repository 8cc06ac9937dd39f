"""The two backends of the expert pass: ``torch`` (PyTorch ops, the executable
specification of the kernels) and ``triton`` (the kernels and their launchers)."""
