"""``FusedMixLoraFFN``: a Hugging Face MLP turned into a MixLoRA block.

The wrapped MLP's projections stay children under their own names (so the base model's
state-dict keys do not change) and stay frozen. The adapter is the router ``moe_gate``
and, per targeted projection, the stacked expert LoRA weights ``lora_A[name]`` (E, r, in)
and ``lora_B[name]`` (E, out, r), and with DoRA experts the magnitudes
``lora_magnitude[name]`` (E, out).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .activations import activation_kind, activation_name_of
from .adapters.dora import ExpertDoRA, lora_row_norms, weight_sq_norms, weight_times_a
from .config import MixLoraConfig, check_config
from .functional import ExpertLoRA, mixlora_ffn
from .plan import BACKENDS, Plan, plan_call
from .projections import adapter_dtype_of, check_base_projection, keep_4bit_weights_unpacked, linear_features
from .routing import expert_counts, router_loss

# MLP layouts: the projection names, and which roles (gate, up, down) each one's LoRA feeds.
MLP_STYLES = {
    "gate_up_down": {"gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",)},
    "fused_gate_up": {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)},
    "fc": {"fc1": ("gate",), "fc2": ("down",)},
}


def _mlp_style(mlp: nn.Module) -> str:
    for style, projections in MLP_STYLES.items():
        if all(isinstance(getattr(mlp, name, None), nn.Module) for name in projections):
            return style
    raise TypeError(
        f"FusedMixLoraFFN.from_mlp: {type(mlp).__name__} has none of the supported MLP layouts "
        "(gate_proj/up_proj/down_proj, gate_up_proj/down_proj, fc1/fc2)"
    )


def _mlp_activation(mlp: nn.Module, config: MixLoraConfig) -> str:
    if config.act_fn is not None:
        return config.act_fn
    for attr in ("act_fn", "activation_fn", "act"):
        module = getattr(mlp, attr, None)
        if isinstance(module, nn.Module):
            name = activation_name_of(module)
            if name is not None:
                return name
    hf_config = getattr(mlp, "config", None)
    for attr in ("hidden_act", "hidden_activation"):
        name = getattr(hf_config, attr, None)
        if isinstance(name, str):
            return name
    raise ValueError(f"cannot tell the activation of {type(mlp).__name__}; set act_fn in the MixLoraConfig")


class FusedMixLoraFFN(nn.Module):
    """MixLoRA FFN block over a frozen base MLP (see ``from_mlp``)."""

    def __init__(
        self,
        mlp: nn.Module,
        config: MixLoraConfig,
        *,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_config(config, "FusedMixLoraFFN")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: must be one of {BACKENDS}")
        self.config = config
        self.backend = backend
        self.style = _mlp_style(mlp)
        self.activation = _mlp_activation(mlp, config)
        activation_kind(self.activation)  # fail early on an unsupported activation
        projections = MLP_STYLES[self.style]
        for name in projections:
            check_base_projection(getattr(mlp, name), f"{type(mlp).__name__}.{name}")
        for name in projections:
            base = getattr(mlp, name)
            base.requires_grad_(False)
            self.add_module(name, base)

        names = list(projections)
        first, last = names[0], names[-1]
        self.hidden_size, first_out = linear_features(getattr(self, first))
        self.intermediate_size = first_out // 2 if self.style == "fused_gate_up" else first_out
        self.num_experts = config.num_experts
        self.scaling = config.expert_scaling

        # target_modules None (the model type's defaults) means every projection of the MLP.
        targeted = [name for name in projections if config.target_modules is None or name in config.target_module_names]
        if not targeted:
            raise ValueError(
                f"MixLoraConfig.target_modules={sorted(config.target_module_names)} names none of "
                f"this MLP's projections {list(projections)}; experts need at least one"
            )
        ref = getattr(self, last).weight if hasattr(getattr(self, last), "weight") else None
        device = ref.device if ref is not None else None
        if dtype is None:
            dtype = adapter_dtype_of(getattr(self, last))
        self.moe_gate = nn.Linear(self.hidden_size, self.num_experts, bias=False, device=device, dtype=torch.float32)
        nn.init.normal_(self.moe_gate.weight, mean=0.0, std=config.router_init_range)
        r = config.expert_r
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in targeted:
            fan_in, fan_out = linear_features(getattr(self, name))
            a = torch.empty(self.num_experts, r, fan_in, device=device, dtype=dtype)
            for e in range(self.num_experts):
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(self.num_experts, fan_out, r, device=device, dtype=dtype))

        # DoRA experts (MixDoRA): a magnitude per expert and output row, kept in fp32 (fp64
        # for an fp64 adapter), the precision of the norms, so that a fresh block's scale
        # m / n is exactly 1; and the frozen weights' squared row norms, computed once here
        # (a quantised weight is dequantised once, not per step).
        self.lora_magnitude = nn.ParameterDict()
        if config.expert_dora:
            wide = torch.promote_types(dtype, torch.float32)
            for name in targeted:
                sq_norms = weight_sq_norms(getattr(self, name)).to(device=device, dtype=wide)
                self.register_buffer(f"weight_sq_norms_{name}", sq_norms, persistent=False)
                m = torch.empty(self.num_experts, sq_norms.shape[0], device=device, dtype=wide)
                self.lora_magnitude[name] = nn.Parameter(m)
            self.reset_magnitudes()

        self.row_mask: torch.Tensor | None = None
        self.last_router_logits: torch.Tensor | None = None
        self.register_buffer(
            "expert_load", torch.zeros(self.num_experts, dtype=torch.long, device=device), persistent=False
        )
        self.register_buffer(
            "expert_load_total", torch.zeros(self.num_experts, dtype=torch.long, device=device), persistent=False
        )

    @classmethod
    def from_mlp(
        cls,
        mlp: nn.Module,
        config: MixLoraConfig,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
    ) -> FusedMixLoraFFN:
        """Wrap a Hugging Face MLP (gate/up/down, Phi3's gate_up_proj, or Phi's fc1/fc2).

        The MLP's weights are frozen and shared; only the router and the expert LoRA
        weights (created in ``dtype``, default the MLP's) require grad. ``backend`` is
        "triton", "torch" or "auto" (triton on CUDA; env MIXLORA_BACKEND overrides).
        A bitsandbytes 4-bit MLP is kept out of bitsandbytes' CPU repacking (bf16, no
        backward; ``keep_4bit_weights_unpacked``), before the DoRA norm probe runs it.

        A fresh block under top-p or switch routing with MoE-PEFT's semantics is not the
        MLP it wraps (``MixLoraConfig.routing_semantics``): that gets a warning.
        """
        check_config(config, "FusedMixLoraFFN.from_mlp")
        keep_4bit_weights_unpacked(mlp)
        block = cls(mlp, config, backend=backend, dtype=dtype)
        config.warn_if_base_changes("FusedMixLoraFFN.from_mlp")
        return block

    @property
    def adapter_dtype(self) -> torch.dtype:
        return next(iter(self.lora_A.values())).dtype

    def expert_lora(self) -> ExpertLoRA:
        """The expert weights as (gate, up, down) roles for ``mixlora_ffn``."""
        roles: dict[str, torch.Tensor] = {}
        f = self.intermediate_size
        for name, a in self.lora_A.items():
            b = self.lora_B[name]
            fed = MLP_STYLES[self.style][name]
            if fed == ("gate", "up"):
                roles.update(gate_A=a, gate_B=b[:, :f], up_A=a, up_B=b[:, f:])
            else:
                roles.update({f"{fed[0]}_A": a, f"{fed[0]}_B": b})
        return ExpertLoRA(**roles)

    def expert_dora(self) -> ExpertDoRA | None:
        """The DoRA magnitudes and frozen-weight norms as roles for ``mixlora_ffn``, or
        None for plain LoRA experts."""
        if not self.lora_magnitude:
            return None
        roles: dict[str, torch.Tensor] = {}
        f = self.intermediate_size
        for name, m in self.lora_magnitude.items():
            sq = getattr(self, f"weight_sq_norms_{name}")
            fed = MLP_STYLES[self.style][name]
            if fed == ("gate", "up"):
                roles.update(gate_m=m[:, :f], up_m=m[:, f:], gate_sq_norms=sq[:f], up_sq_norms=sq[f:])
            else:
                roles.update({f"{fed[0]}_m": m, f"{fed[0]}_sq_norms": sq})
        return ExpertDoRA(**roles)

    @torch.no_grad()
    def current_row_norms(self, name: str) -> torch.Tensor:
        """||W + s B_e A_e|| per expert and output row of projection ``name``, (E, out) in
        the magnitudes' dtype: what they are divided by."""
        a = self.lora_A[name]
        wa = weight_times_a(getattr(self, name), a.to(adapter_dtype_of(getattr(self, name))))
        norms = lora_row_norms(getattr(self, f"weight_sq_norms_{name}"), wa, a, self.lora_B[name], self.scaling)
        return norms.to(self.lora_magnitude[name].dtype)

    @torch.no_grad()
    def reset_magnitudes(self) -> None:
        """Set every DoRA magnitude to the current row norms: a scale of 1, the state of a
        fresh adapter, and what an adapter saved without magnitudes computes after loading."""
        for name, m in self.lora_magnitude.items():
            m.copy_(self.current_row_norms(name))

    def _apply(self, fn, recurse=True):
        # ||W||^2 is computed once, in the precision of the frozen weights of that time. A
        # cast of the block (``.double()``, ``model.to(torch.bfloat16)``) converts the buffer
        # but cannot give it the precision, or the rounding, of the weights it now belongs
        # to: fp32 sums read back as fp64 stay 1e-7 off, and a half-precision cast would
        # leave it in fp16. So where a frozen weight's dtype changed, compute it again, in
        # fp32 or wider as at construction.
        before = {name: adapter_dtype_of(getattr(self, name)) for name in self.lora_magnitude}
        module = super()._apply(fn, recurse)
        if any(adapter_dtype_of(getattr(self, name)) != dtype for name, dtype in before.items()):
            wide = torch.promote_types(self.adapter_dtype, torch.float32)
            with torch.no_grad():
                for name in before:
                    old = getattr(self, f"weight_sq_norms_{name}")
                    setattr(self, f"weight_sq_norms_{name}", weight_sq_norms(getattr(self, name)).to(old.device, wide))
        return module

    def base_projections(self) -> dict:
        """The frozen base projections as ``mixlora_ffn`` (and ``mixlora_kernels.testing.reference.mixlora_ffn``)
        take them: gate_proj / up_proj / down_proj, gate_up_proj / down_proj, or fc1 / fc2
        as gate_proj / down_proj."""
        if self.style == "gate_up_down":
            return {"gate_proj": self.gate_proj, "up_proj": self.up_proj, "down_proj": self.down_proj}
        if self.style == "fused_gate_up":
            return {"gate_up_proj": self.gate_up_proj, "down_proj": self.down_proj}
        return {"gate_proj": self.fc1, "down_proj": self.fc2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"FusedMixLoraFFN: input has shape {shape}, expected (..., {self.hidden_size})")
        router = self.moe_gate.weight
        if x.device != router.device:
            raise ValueError(f"FusedMixLoraFFN: input is on {x.device} but the module is on {router.device}")
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != self.adapter_dtype:
            raise ValueError(
                f"FusedMixLoraFFN: input is {x.dtype} but the adapter weights are {self.adapter_dtype}; "
                "cast the input or the module, or run under torch.autocast"
            )
        cfg = self.config
        # The strategy's options mixlora_ffn takes (switch's z-loss coefficient is the loss's).
        routing = {k: v for k, v in cfg.strategy_options().items() if k != "router_z_loss_coef" and v is not None}
        result = mixlora_ffn(
            x,
            router,
            self.expert_lora(),
            **self.base_projections(),
            routing_strategy=cfg.routing_strategy,
            routing_semantics=cfg.routing_semantics,
            **routing,
            activation=self.activation,
            scaling=self.scaling,
            dropout=cfg.expert_dropout,
            jitter_noise=cfg.jitter_noise,
            training=self.training,
            backend=self.backend,
            dora=self.expert_dora(),
        )
        self.last_router_logits = result.router_logits
        with torch.no_grad():
            counts = result.expert_counts
            mask = self.row_mask
            if mask is not None and mask.numel() == result.experts.shape[0]:
                # Padding rows are routed too, but are not load: count real rows only.
                padded = ~mask.reshape(-1, 1).to(device=result.experts.device, dtype=torch.bool)
                counts = expert_counts(result.experts.masked_fill(padded, self.num_experts), self.num_experts)
            self.expert_load.copy_(counts)
            self.expert_load_total.add_(counts)
        return result.out

    def plan(self) -> Plan:
        """The path the next forward takes (``plan.Plan``), in the current train/eval mode."""
        cfg = self.config
        return plan_call(
            backend=self.backend, device=self.moe_gate.weight.device, spec=cfg.routing_spec(),
            num_experts=self.num_experts, rank=cfg.expert_r, lora_dropout=cfg.expert_dropout if self.training else 0.0,
            with_dora=bool(self.lora_magnitude),
        )  # fmt: skip

    def __getstate__(self) -> dict:
        # The last forward's logits hold the autograd graph; copies and pickles drop them.
        state = super().__getstate__()
        state["last_router_logits"] = None
        return state

    def extra_repr(self) -> str:
        return (
            f"style={self.style}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
            f"experts={self.num_experts}, r={self.config.expert_r}, routing={self.config.routing_spec()}, "
            f"activation={self.activation}, backend={self.backend}" + (", dora" if self.lora_magnitude else "")
        )

    def router_loss(self) -> torch.Tensor:
        """The scaled router loss of the last forward (0 when disabled or none ran)."""
        return _router_loss_over([self])


def _router_loss_over(blocks: list[FusedMixLoraFFN]) -> torch.Tensor:
    blocks = [b for b in blocks if b.last_router_logits is not None]
    if not blocks or not blocks[0].config.router_loss:
        device = blocks[0].moe_gate.weight.device if blocks else None
        return torch.zeros((), device=device)
    cfg = blocks[0].config
    logits = torch.cat([b.last_router_logits for b in blocks], dim=0)
    masks = [b.row_mask for b in blocks]
    row_mask = None
    if any(m is not None for m in masks):
        row_mask = torch.cat(
            [
                torch.ones(b.last_router_logits.shape[0], dtype=torch.bool, device=logits.device)
                if m is None
                else m.reshape(-1).to(device=logits.device, dtype=torch.bool)
                for b, m in zip(blocks, masks)
            ]
        )
    return router_loss(
        logits,
        cfg.routing_spec(),
        aux_loss_coef=cfg.router_aux_loss_coef,
        row_mask=row_mask,
    )


def mixlora_blocks(model_or_module: nn.Module) -> list[FusedMixLoraFFN]:
    """Every FusedMixLoraFFN in a model (or the module itself), in module order."""
    return [m for m in model_or_module.modules() if isinstance(m, FusedMixLoraFFN)]


def router_aux_loss(model_or_module: nn.Module) -> torch.Tensor:
    """Router loss of the last forward, scaled by the config's coefficients, with grad.

    Over a model it is computed once over the rows of all MixLoRA layers together, as
    MoE-PEFT and HF Mixtral do; it is 0 when ``router_loss`` is off or nothing ran.
    """
    blocks = mixlora_blocks(model_or_module)
    if not blocks:
        raise ValueError(f"router_aux_loss: {type(model_or_module).__name__} holds no FusedMixLoraFFN")
    return _router_loss_over(blocks)
