"""``generate_with_cuda_graphs``: Hugging Face ``generate()`` with every decode step
replayed from a CUDA graph.

At batch sizes of 1 to 8 a decode step is bound by launches: a 7B model runs hundreds of
small kernels a step, with Python between them. ``generate`` can compile its decode step
with ``torch.compile(mode="reduce-overhead")`` over a static KV cache; the compiled step
is captured as a CUDA graph on its first calls and replayed after. The MixLoRA layers
take part as they are: their operators compile without graph breaks and never
synchronise with the host. This function asks for that in one call, with ``fullgraph``
set so that a graph break is an error rather than a silently split graph. The prefill
runs eagerly, as ``generate`` does it.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

# Caches that grow as they fill: a captured graph needs fixed addresses and shapes.
_GROWING_CACHES = ("dynamic", "offloaded", "quantized")


def graphed_generation_kwargs(**kwargs: Any) -> dict[str, Any]:
    """``kwargs`` with what graph-captured decoding needs added where the caller left it
    out: a static KV cache, and a compile config of ``mode="reduce-overhead"`` and
    ``fullgraph=True``."""
    from transformers import CompileConfig

    if kwargs.get("disable_compile"):
        raise ValueError("generate_with_cuda_graphs: disable_compile=True leaves nothing to capture")
    cache = kwargs.setdefault("cache_implementation", "static")
    if cache in _GROWING_CACHES:
        raise ValueError(
            f"generate_with_cuda_graphs: cache_implementation={cache!r} grows as it fills and cannot be "
            "captured; CUDA graphs need a cache of fixed size ('static')"
        )
    kwargs.setdefault("compile_config", CompileConfig(fullgraph=True, mode="reduce-overhead"))
    return kwargs


def generate_with_cuda_graphs(model: nn.Module, inputs=None, **kwargs: Any):
    """``model.generate(inputs, **kwargs)`` with each decode step captured once as a CUDA
    graph and replayed (see the module's docstring); the same tokens as eager generation.

    ``kwargs`` are ``generate``'s. Left out, ``cache_implementation`` is ``"static"`` and
    ``compile_config`` is ``CompileConfig(fullgraph=True, mode="reduce-overhead")``; pass
    either to choose otherwise (``max_cache_len`` through ``cache_config`` or a
    ``GenerationConfig``, as ``generate`` takes it). The first call compiles (seconds to
    a minute); later calls at the same batch size replay.

    Off a CUDA device there are no CUDA graphs: it warns and runs ``model.generate`` with
    the caller's arguments as given.
    """
    generate = getattr(model, "generate", None)
    if not callable(generate):
        raise TypeError(f"generate_with_cuda_graphs: {type(model).__name__} has no generate() method")
    device = getattr(model, "device", None)
    if device is None or device.type != "cuda":
        where = "no device" if device is None else f"a {device.type} device"
        warnings.warn(
            f"generate_with_cuda_graphs: the model is on {where}; CUDA graphs need a CUDA device, "
            "so this runs model.generate() without them",
            RuntimeWarning,
            stacklevel=2,
        )
        return generate(inputs, **kwargs)
    return generate(inputs, **graphed_generation_kwargs(**kwargs))
