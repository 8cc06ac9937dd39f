"""The ``torch.library`` boundary: every stage the backends run, as a PyTorch operator
that ``torch.compile`` sees as one node and a CUDA graph can capture (nothing in them
synchronises with the host).

An operator's outputs are tensors, never None: an output that a call does not produce
(Y without a down LoRA, the saved shrinks Zd outside the Triton path, the gradient of an
absent weight) is an empty tensor, and the wrappers turn it back into None. Which outputs
exist follows from the arguments, so the fake implementations know it too.
"""

from .dora_combine import dora_combine_op
from .expert_pass import expert_pass
from .route import ROUTER_DTYPES, route_switch_op, route_top_p_op, route_topk_op, router_op

__all__ = [
    "ROUTER_DTYPES",
    "dora_combine_op",
    "expert_pass",
    "route_switch_op",
    "route_top_p_op",
    "route_topk_op",
    "router_op",
]
