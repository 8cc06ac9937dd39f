"""Training helpers: the router loss in the Hugging Face Trainer, and expert-load statistics.

In a plain loop the router loss is one term: ``loss = out.loss + router_aux_loss(model)``.
``MixLoraTrainer`` (a ``transformers.Trainer``) adds it for you and logs it together with
the per-layer expert load; ``MixLoraTrainerMixin`` does the same for other Trainer
subclasses (``class MyTrainer(MixLoraTrainerMixin, SFTTrainer)``). ``MixLoraTrainer`` is
built on first access, so importing this package does not import the Trainer stack.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import CONFIG_NAME
from ..modules import mixlora_blocks, router_aux_loss
from .adapter import load_adapter, save_adapter


class ExpertLoad(NamedTuple):
    """Tokens routed to each expert, per MixLoRA layer (a token counts once per slot)."""

    last: torch.Tensor  # (layers, E) int64: the last forward
    total: torch.Tensor  # (layers, E) int64: accumulated since injection or reset_expert_load


def _blocks(model: nn.Module) -> list:
    blocks = mixlora_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} holds no MixLoRA blocks")
    return blocks


def expert_load_stats(model: nn.Module) -> ExpertLoad:
    """Per-layer expert load of the last forward and accumulated, as CPU tensors.

    The counts are this process's own. Under DDP, pass ``broadcast_buffers=False`` (else
    rank 0's counters overwrite the others' at each forward) and all-reduce the result
    to get the global load.
    """
    blocks = _blocks(model)
    last = torch.stack([b.expert_load.detach().cpu() for b in blocks])
    total = torch.stack([b.expert_load_total.detach().cpu() for b in blocks])
    return ExpertLoad(last, total)


def reset_expert_load(model: nn.Module) -> None:
    """Zero the accumulated expert-load counters of every MixLoRA layer."""
    for block in _blocks(model):
        block.expert_load_total.zero_()


def load_imbalance(counts: torch.Tensor) -> torch.Tensor:
    """max / mean of the per-expert counts of each layer (1 = balanced, E = one expert).

    ``counts`` is (layers, E); a layer that routed nothing reports 1.
    """
    counts = counts.to(torch.float64)
    mean = counts.mean(dim=-1)
    return torch.where(mean > 0, counts.amax(dim=-1) / mean.clamp(min=1e-12), torch.ones_like(mean))


class MixLoraTrainerMixin:
    """Adds the router loss to a Trainer's training loss and logs it with the expert load,
    and makes its checkpoints adapter-only.

    ``compute_loss`` adds ``router_aux_loss(model)`` in training mode (evaluation losses
    stay the language-model loss), scaled the way the Trainer scales the model's loss for
    gradient accumulation. Each training log gains ``router_loss`` (mean since the last
    log) and ``expert_load_imbalance/layer_{i}`` (max/mean tokens per expert since the
    last log).

    Checkpoints and ``save_model()`` write the adapter (``adapter_config.json`` and
    ``adapter_model.safetensors``, what ``save_adapter`` writes and ``load_adapter``
    reads) instead of the whole model: megabytes rather than the frozen base's gigabytes.
    The Trainer's optimizer, scheduler, RNG and trainer state files sit beside it as
    usual, so ``train(resume_from_checkpoint=...)`` resumes, loading the adapter back
    into the model, and ``load_best_model_at_end`` loads the best checkpoint's adapter.
    """

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not mixlora_blocks(self.model):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_adapter(self.model, output_dir)  # every rank: FSDP2 gathers; rank 0 writes
        if not self.args.should_save:
            return None
        processor = self.processing_class
        if processor is None:
            processor = getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.model if model is None else model
        if _holds_adapter(resume_from_checkpoint) and mixlora_blocks(model):
            load_adapter(model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and _holds_adapter(best) and mixlora_blocks(self.model):
            load_adapter(self.model, best)
            return
        super()._load_best_model()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            aux = router_aux_loss(model)
            self._router_loss_sum = getattr(self, "_router_loss_sum", 0.0) + aux.detach()
            self._router_loss_count = getattr(self, "_router_loss_count", 0) + 1
            if self._loss_is_scaled_for_ga(num_items_in_batch):
                # The model's loss is already a mean over the whole accumulated batch, so the
                # Trainer will not divide it by the accumulation steps; the router loss, a
                # mean over this micro-batch, still needs that division.
                steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
                aux = aux / steps
            loss = loss + aux.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        # Mirrors Trainer.training_step's decision whether to divide the loss (older
        # transformers lack some of these attributes, hence the getattr defaults).
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return bool(
            (accepts and num_items_in_batch is not None) or getattr(self, "compute_loss_func", None) is not None
        )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            count = getattr(self, "_router_loss_count", 0)
            if count:
                logs["router_loss"] = float(self._router_loss_sum) / count
            self._router_loss_sum, self._router_loss_count = 0.0, 0
            if mixlora_blocks(self.model):
                total = expert_load_stats(self.model).total
                previous = getattr(self, "_expert_load_logged", None)
                since = total - previous if previous is not None and previous.shape == total.shape else total
                self._expert_load_logged = total
                for i, value in enumerate(load_imbalance(since).tolist()):
                    logs[f"expert_load_imbalance/layer_{i}"] = value
        super().log(logs, *args, **kwargs)


def _holds_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def _build_trainer() -> type:
    from transformers import Trainer

    class MixLoraTrainer(MixLoraTrainerMixin, Trainer):
        """``transformers.Trainer`` that trains the MixLoRA router loss (see MixLoraTrainerMixin)."""

    MixLoraTrainer.__module__ = __name__
    MixLoraTrainer.__qualname__ = "MixLoraTrainer"
    return MixLoraTrainer


def __getattr__(name: str) -> Any:
    if name == "MixLoraTrainer":
        cls = _build_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
