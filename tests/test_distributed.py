"""MixLoRA under torch DDP and FSDP2 (``fully_shard``): two CPU processes on gloo, each
taking half of a global batch, must produce the gradients (and, after one SGD step, the
saved adapter) of one process running the same two half-batches.

Data parallelism averages per-process losses, so the single-process reference averages
the two half-batch losses too. The router loss is per process (as in HF Mixtral under
DDP): the load-balance loss of a batch is not the mean of its halves' losses.

FSDP2 all-gathers one flat buffer per ``fully_shard`` unit and needs every parameter of a
unit to share one dtype. The router is fp32 by design, so a decoder layer stored in bf16
cannot be one unit; keep the sharded parameters in fp32 (FSDP2's usual mixed-precision
setup, with ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` for compute), as here.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import assert_close

from mixlora_kernels import adapter_state_dict, router_aux_loss, save_adapter

WORLD = 2
LR = 0.1


def _batch(rank: int | None) -> dict[str, torch.Tensor]:
    """The global batch (4 sequences, two with right padding), or rank's half of it."""
    from hf_models import tokens

    ids = tokens(batch=4, length=10, seed=11)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    if rank is None:
        return batch
    return {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}


def _model(dtype: torch.dtype):
    from hf_models import injected

    _, model = injected(dtype=dtype)
    return model.train()


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad
            out[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return out


def _step(model, trained) -> None:
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param -= LR * param.grad
    trained.zero_grad(set_to_none=True)


def _run_ddp(rank: int, out_dir: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = _model(torch.float64)
    ddp = DistributedDataParallel(model)
    out = ddp(**_batch(rank))
    (out.loss + router_aux_loss(ddp)).backward()
    grads = _grads(model)
    _step(model, ddp)
    save_adapter(ddp, os.path.join(out_dir, "ddp-adapter"))
    return grads


def _run_fsdp2(rank: int, out_dir: str) -> dict:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import fully_shard

    model = _model(torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    out = model(**_batch(rank))
    (out.loss + router_aux_loss(model)).backward()
    grads = _grads(model)
    _step(model, model)
    save_adapter(model, os.path.join(out_dir, "fsdp2-adapter"))
    return grads


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        for mode, run in (("ddp", _run_ddp), ("fsdp2", _run_fsdp2)):
            try:
                grads = run(rank, out_dir)
            except Exception:
                with open(os.path.join(out_dir, f"{mode}.rank{rank}.error"), "w") as fh:
                    fh.write(traceback.format_exc())
                raise
            if rank == 0:
                torch.save(grads, os.path.join(out_dir, f"{mode}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    """Runs both modes once in two spawned processes; returns the output directory."""
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out_dir = tmp_path_factory.mktemp("distributed")
    store = os.path.join(tempfile.mkdtemp(dir=out_dir), "store")
    # The children import this module by name: give them the test directory on their path.
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        mp.spawn(_worker, args=(store, str(out_dir)), nprocs=WORLD, join=True)
    except Exception as err:
        (out_dir / "spawn.error").write_text(f"{type(err).__name__}: {err}")
    return out_dir


def _reference(dtype: torch.dtype) -> tuple[dict, dict]:
    """One process, the same two half-batches, each loss halved: gradients, then the adapter after one step."""
    model = _model(dtype)
    for rank in range(WORLD):
        out = model(**_batch(rank))
        ((out.loss + router_aux_loss(model)) / WORLD).backward()
    grads = _grads(model)
    _step(model, model)
    return grads, adapter_state_dict(model)


def _results(out_dir, mode: str) -> dict:
    errors = sorted(out_dir.glob(f"{mode}.rank*.error"))
    if errors:
        pytest.fail(f"{mode} failed in a worker:\n{errors[0].read_text()}")
    if not (out_dir / f"{mode}.pt").is_file():
        spawn_error = out_dir / "spawn.error"
        pytest.fail(f"{mode} produced no result: {spawn_error.read_text() if spawn_error.is_file() else 'unknown'}")
    return torch.load(out_dir / f"{mode}.pt", weights_only=True)


@pytest.mark.parametrize(("mode", "dtype"), [("ddp", torch.float64), ("fsdp2", torch.float32)], ids=["ddp", "fsdp2"])
def test_two_processes_match_one(distributed_run, mode, dtype):
    from safetensors.torch import load_file

    got = _results(distributed_run, mode)
    expected, adapter = _reference(dtype)
    assert got.keys() == expected.keys() and len(got) == 30
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        assert_close(got[name], grad, dtype, reduction=64, name=f"{mode} grad {name}")
    saved = load_file(distributed_run / f"{mode}-adapter" / "adapter_model.safetensors")
    assert saved.keys() == adapter.keys()
    for key, value in adapter.items():
        assert_close(saved[key], value, dtype, reduction=64, name=f"{mode} adapter {key}")
