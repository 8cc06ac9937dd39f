"""Benchmarks of mixlora_kernels against the dense FFN floor and the MixLoRA baselines."""
