"""Training: the README path, the router loss and its gradient, padding kept out of it,
loss going down, the Trainer subclass, expert-load statistics and the examples."""

from __future__ import annotations

import copy
import importlib.util
import pathlib

import pytest
import torch
from hf_models import injected, mixlora_config, tiny_model, tokens

from mixlora_kernels import (
    expert_load_stats,
    inject_mixlora,
    load_adapter,
    reset_expert_load,
    router_aux_loss,
)
from mixlora_kernels.modules import mixlora_blocks
from mixlora_kernels.routing import route_top_p
from mixlora_kernels.testing.reference import router_loss as reference_router_loss

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_router_loss_has_a_gradient_reaching_every_router():
    _, model = injected()
    model.train()
    model(input_ids=tokens())
    loss = router_aux_loss(model)
    assert loss.item() > 0 and loss.requires_grad
    loss.backward()
    for block in mixlora_blocks(model):
        grad = block.moe_gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_language_model_loss_reaches_every_adapter_parameter():
    _, model = injected()
    model.train()
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_padding_rows_stay_out_of_the_router_loss():
    _, model = injected(dtype=torch.float64)
    a, b = tokens(batch=1, length=7, seed=1), tokens(batch=1, length=4, seed=2)
    # Right padding: the real tokens of a causal LM never see the pads, so their router
    # logits equal those of the sequences run alone.
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0], ids[1, :4] = a[0], b[0]
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    model(input_ids=ids, attention_mask=mask)
    padded = router_aux_loss(model)
    coef = mixlora_config().router_aux_loss_coef
    logits = []
    for seq in (a, b):
        model(input_ids=seq)
        logits.append([blk.last_router_logits for blk in mixlora_blocks(model)])
    expected = reference_router_loss(
        torch.cat([layer[i] for i in range(2) for layer in logits]),
        top_k=2,
        routing_strategy="mixlora",
        aux_loss_coef=coef,
        z_loss_coef=0.0,
    )
    torch.testing.assert_close(padded, expected, rtol=1e-9, atol=1e-12)
    model(input_ids=ids)  # no mask: the padding rows count, and the loss differs
    assert not torch.allclose(router_aux_loss(model), expected, rtol=1e-6, atol=0)


def test_a_few_training_steps_lower_the_loss():
    model = inject_mixlora(tiny_model(), mixlora_config(lora_dropout=0.05), backend="torch")
    model.train()
    ids = tokens(batch=4, length=6).repeat(1, 3)  # repeats: something a few steps can learn
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        out = model(input_ids=ids, labels=ids)
        (out.loss + router_aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_expert_load_stats_last_and_accumulated():
    _, model = injected()
    ids = tokens(batch=2, length=5)
    model(input_ids=ids)
    first = expert_load_stats(model)
    assert first.last.shape == (2, 4) and first.last.dtype == torch.int64
    assert first.last.sum(dim=1).tolist() == [2 * 5 * 2] * 2  # tokens x top_k per layer
    model(input_ids=ids[:, :3])
    second = expert_load_stats(model)
    assert second.last.sum(dim=1).tolist() == [2 * 3 * 2] * 2
    assert torch.equal(second.total, first.last + second.last)
    reset_expert_load(model)
    assert expert_load_stats(model).total.sum() == 0
    with pytest.raises(ValueError, match="no MixLoRA"):
        expert_load_stats(tiny_model())


def test_expert_load_of_top_p_routing_counts_each_tokens_experts():
    _, model = injected(routing_strategy="mixlora-dynamic", top_p=0.6)
    ids = tokens(batch=2, length=7)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    seen = []
    remember = lambda block, args, out: seen.append(block.last_router_logits)
    hooks = [block.register_forward_hook(remember) for block in mixlora_blocks(model)]
    model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    load = expert_load_stats(model).last
    for layer, logits in enumerate(seen):
        routing = route_top_p(logits.detach()[mask.reshape(-1).bool()], 0.6, 0.0)
        assert torch.equal(load[layer], torch.bincount(routing.experts.reshape(-1), minlength=5)[:4])
        used = (routing.experts < 4).sum()
        assert load[layer].sum() == used and 12 <= used <= 12 * 4  # 12 real tokens, 1..E experts each


def _trainer(model, tmp_path, **args):
    from transformers import TrainingArguments

    from mixlora_kernels import MixLoraTrainer

    ids = tokens(batch=8, length=10)
    data = [{"input_ids": row, "labels": row} for row in ids]
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    defaults.update(args)
    return MixLoraTrainer(model=model, args=TrainingArguments(**defaults), train_dataset=data)


@pytest.mark.parametrize("strategy", ["mixlora", "mixlora-dynamic"])
def test_trainer_adds_the_router_loss_and_logs_it(tmp_path, strategy):
    _, model = injected(routing_strategy=strategy)
    trainer = _trainer(model, tmp_path)
    model.train()
    ids = tokens(batch=2, length=10)
    inputs = {"input_ids": ids, "labels": ids}
    loss = trainer.compute_loss(model, dict(inputs))
    out = model(**inputs)
    torch.testing.assert_close(loss, out.loss + router_aux_loss(model))
    model.eval()
    torch.testing.assert_close(trainer.compute_loss(model, dict(inputs)), model(**inputs).loss)

    routers = [b.moe_gate.weight.detach().clone() for b in mixlora_blocks(model)]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    assert all(entry["router_loss"] > 0 for entry in logs)
    assert all(1.0 <= entry["expert_load_imbalance/layer_1"] <= 4.0 for entry in logs)
    assert all(not torch.equal(r, b.moe_gate.weight) for r, b in zip(routers, mixlora_blocks(model)))


def test_trainer_scales_the_router_loss_for_gradient_accumulation(tmp_path):
    _, model = injected()
    trainer = _trainer(model, tmp_path, gradient_accumulation_steps=2)
    trainer.current_gradient_accumulation_steps = 2
    model.train()
    ids = tokens(batch=2, length=10)
    inputs = {"input_ids": ids, "labels": ids}
    items = torch.tensor(40)  # the LM loss is then a sum over tokens / 40: already scaled for accumulation
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=items)
    lm = model(**inputs, num_items_in_batch=items).loss
    torch.testing.assert_close(loss, lm + router_aux_loss(model) / 2)


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_finetune_then_generate(tmp_path, capsys):
    losses = _load_example("finetune_tiny_llama").main([str(tmp_path), "--steps", "12"])
    assert losses["last_loss"] < losses["first_loss"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    text = _load_example("inference").main([str(tmp_path), "--prompt", "the cat", "--max-new-tokens", "5"])
    assert text.startswith("the cat") and len(text) >= len("the cat")
    assert "saved the adapter" in capsys.readouterr().out


def test_lora_dropout_is_off_in_eval_for_attention_lora():
    model = inject_mixlora(copy.deepcopy(tiny_model()), mixlora_config(lora_dropout=0.5), backend="torch")
    lora = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(3, 32)
    lora.eval()
    expected = lora.base_layer(x) + lora.scaling * x @ lora.lora_A.weight.t() @ lora.lora_B.weight.t()
    torch.testing.assert_close(lora(x), expected)
    lora.train()
    assert not torch.allclose(lora(x), expected)


def _adapter_weights(model) -> dict[str, torch.Tensor]:
    from mixlora_kernels import adapter_state_dict

    return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def test_trainer_checkpoints_are_adapters_that_load_and_resume(tmp_path):
    config = mixlora_config(lora_dropout=0.0)
    _, model = injected(config=config)
    start = _adapter_weights(model)
    run = tmp_path / "run"
    trainer = _trainer(model, run, max_steps=4, save_strategy="steps", save_steps=2, seed=3)
    trainer.train()
    final = _adapter_weights(model)

    checkpoint = run / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert (checkpoint / "adapter_model.safetensors").stat().st_size <= adapter_bytes + 16384  # header only on top

    # The last checkpoint is the trained adapter, readable by load_adapter.
    reloaded = load_adapter(tiny_model(), run / "checkpoint-4", backend="torch")
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)

    # Resuming from step 2 in a fresh model lands on the uninterrupted run's weights.
    _, fresh = injected(config=config)
    assert all(torch.equal(v, start[k]) for k, v in _adapter_weights(fresh).items())
    resumed = _trainer(fresh, tmp_path / "resumed", max_steps=4, save_strategy="no", seed=3)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    for key, value in _adapter_weights(fresh).items():
        torch.testing.assert_close(value, final[key], atol=1e-6, rtol=1e-5, msg=key)

    # save_model writes the adapter too.
    resumed.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_config.json").is_file()
    assert not (tmp_path / "saved" / "model.safetensors").exists()
    again = load_adapter(tiny_model(), tmp_path / "saved", backend="torch")
    for key, value in _adapter_weights(again).items():
        torch.testing.assert_close(value, final[key], atol=1e-6, rtol=1e-5, msg=key)
