"""The adapters every MixLoRA layer is made of: LoRA (``lora``: the attention
projections' ``LoraLinear``) and DoRA (``dora``: the magnitudes, row norms and scales of
DoRA attention and MixDoRA experts)."""
