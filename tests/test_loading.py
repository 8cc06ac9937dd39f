"""MixLoraModelForCausalLM.from_pretrained, the mixlora package's one-call loader: the
snippet of that package's README runs with only its import changed and loads what
load_adapter loads; adapters that cannot be loaded are refused before any download or
model build; save_adapter refuses a path that cannot be a directory before it works."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil

import huggingface_hub
import pytest
import torch
from hf_models import mixlora_config, randomize_adapter, tiny_model, tokens
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

import mixlora_kernels.integrations.adapter as adapter_module
from mixlora_kernels import (
    MixLoraConfig,
    MixLoraModelForCausalLM,
    adapter_state_dict,
    inject_mixlora,
    load_adapter,
    save_adapter,
)
from mixlora_kernels.config import CONFIG_NAME
from mixlora_kernels.integrations.adapter import BIN_NAME, SAFETENSORS_NAME
from mixlora_kernels.modules import mixlora_blocks

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

# The mixlora package's README (section "Use MixLoRA"), with only the import changed.
README_SNIPPET = """
from mixlora_kernels import MixLoraModelForCausalLM
from transformers import AutoTokenizer

model, config = MixLoraModelForCausalLM.from_pretrained(name_or_path_to_the_adapter, ...)
tokenizer = AutoTokenizer.from_pretrained(config.base_model_name_or_path)
"""

ADAPTERS = {
    "mixlora": {},
    "mixlora-dynamic": {"routing_strategy": "mixlora-dynamic"},
    "mixlora-switch": {"routing_strategy": "mixlora-switch"},
    "mixdora": {"use_dora": True},
}


def _save_tokenizer(path: pathlib.Path) -> None:
    """A word-level tokenizer over the tiny model's 128 ids ("w3" is id 3), built offline."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(path)


def _saved_adapter(tmp_path: pathlib.Path, base_name: str | None = "local", **overrides) -> pathlib.Path:
    """A tiny llama saved under tmp_path/base and a randomised adapter for it under
    tmp_path/adapter whose config names that directory (or ``base_name`` if not "local")."""
    base_dir = tmp_path / "base"
    base = tiny_model()
    base.save_pretrained(base_dir)
    _save_tokenizer(base_dir)
    name = str(base_dir) if base_name == "local" else base_name
    model = inject_mixlora(base, mixlora_config(base_model_name_or_path=name, **overrides), backend="torch")
    randomize_adapter(model)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _generate(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )


def _fail(*args, **kwargs):
    raise AssertionError("the loader must refuse the adapter before downloading or building anything")


def _no_download_or_build(monkeypatch) -> None:
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _fail)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fail)


@pytest.mark.parametrize("overrides", ADAPTERS.values(), ids=ADAPTERS.keys())
def test_the_mixlora_readme_snippet_loads_what_load_adapter_loads(tmp_path, overrides):
    adapter = _saved_adapter(tmp_path, **overrides)
    namespace = {"name_or_path_to_the_adapter": str(adapter)}
    exec(README_SNIPPET.replace(", ...)", ")"), namespace)
    model, config, tokenizer = namespace["model"], namespace["config"], namespace["tokenizer"]

    expected = load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapter)
    assert isinstance(config, MixLoraConfig) and config is model.mixlora_config
    assert config == MixLoraConfig.from_pretrained(adapter) == expected.mixlora_config
    assert not model.training and len(mixlora_blocks(model)) == 2
    got, want = adapter_state_dict(model), adapter_state_dict(expected)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    ids = tokenizer("w5 w17 w99 w42", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[5, 17, 99, 42]]
    out = _generate(model, ids)
    assert torch.equal(out, _generate(expected, ids))
    base_out = _generate(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tokens(batch=1, length=7))
    assert not torch.equal(_generate(model, tokens(batch=1, length=7)), base_out), "the adapter changes nothing"


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_keywords_reach_the_base_model(tmp_path, keyword):
    adapter = _saved_adapter(tmp_path, use_dora=True)
    model, config = MixLoraModelForCausalLM.from_pretrained(
        adapter, **{keyword: torch.float64}, backend="torch", adapter_name="default"
    )
    assert model.dtype == torch.float64
    # The router is fp32 whatever the base; every LoRA and DoRA weight takes the base's dtype.
    weights = adapter_state_dict(model)
    assert {t.dtype for k, t in weights.items() if "moe_gate" not in k} == {torch.float64}
    assert all(block.backend == "torch" for block in mixlora_blocks(model))
    assert config == MixLoraConfig.from_pretrained(adapter)
    ids = tokens(batch=1, length=5)
    expected = load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float64), adapter)
    torch.testing.assert_close(model(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["null", "missing", "empty"])
def test_an_adapter_without_its_base_is_refused_at_once(tmp_path, monkeypatch, how):
    adapter = _saved_adapter(tmp_path)
    file = adapter / CONFIG_NAME
    data = json.loads(file.read_text())
    if how == "missing":
        del data["base_model_name_or_path"]
    else:
        data["base_model_name_or_path"] = None if how == "null" else ""
    file.write_text(json.dumps(data))
    _no_download_or_build(monkeypatch)
    with pytest.raises(ValueError, match="base_model_name_or_path is missing or null") as err:
        MixLoraModelForCausalLM.from_pretrained(adapter)
    assert f"load_adapter(base, {str(adapter)!r})" in str(err.value) and str(file) in str(err.value)


def test_an_adapter_saved_from_a_base_built_in_memory_names_no_base(tmp_path, monkeypatch):
    """A base built from a config has no name or path: save_adapter writes null."""
    save_adapter(inject_mixlora(tiny_model(), mixlora_config(), backend="torch"), tmp_path / "adapter")
    assert MixLoraConfig.from_pretrained(tmp_path / "adapter").base_model_name_or_path is None
    _no_download_or_build(monkeypatch)
    with pytest.raises(ValueError, match="base_model_name_or_path is missing or null"):
        MixLoraModelForCausalLM.from_pretrained(tmp_path / "adapter")


def test_the_inference_example_refuses_an_adapter_without_its_base(tmp_path, monkeypatch):
    _saved_adapter(tmp_path, base_name=None)
    spec = importlib.util.spec_from_file_location("example_inference", EXAMPLES / "inference.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    _no_download_or_build(monkeypatch)
    with pytest.raises(ValueError, match="base_model_name_or_path is missing or null"):
        example.main([str(tmp_path)])


def test_a_task_type_other_than_a_causal_lm_is_refused(tmp_path, monkeypatch):
    adapter = _saved_adapter(tmp_path)
    file = adapter / CONFIG_NAME
    file.write_text(json.dumps({**json.loads(file.read_text()), "task_type": "SEQ_CLS"}))
    _no_download_or_build(monkeypatch)
    with pytest.raises(ValueError, match="task_type='SEQ_CLS'"):
        MixLoraModelForCausalLM.from_pretrained(adapter)


def test_a_missing_adapter_directory_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    _no_download_or_build(monkeypatch)
    with pytest.raises(FileNotFoundError, match="no such adapter directory"):
        MixLoraModelForCausalLM.from_pretrained(tmp_path / "nowhere" / "adapter")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        MixLoraModelForCausalLM.from_pretrained(tmp_path / "file")


def test_a_hub_adapter_downloads_its_config_before_its_weights(tmp_path, monkeypatch):
    adapter = _saved_adapter(tmp_path)
    calls = []

    def snapshot_download(repo_id, repo_type, allow_patterns, **kwargs):
        calls.append((repo_id, sorted(allow_patterns), kwargs))
        return str(adapter)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model, _ = MixLoraModelForCausalLM.from_pretrained("someone/tiny-mixlora", local_files_only=True)
    assert calls == [
        ("someone/tiny-mixlora", [CONFIG_NAME], {"local_files_only": True}),
        ("someone/tiny-mixlora", sorted([CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME]), {"local_files_only": True}),
    ]
    assert len(mixlora_blocks(model)) == 2

    file = adapter / CONFIG_NAME
    file.write_text(json.dumps({**json.loads(file.read_text()), "base_model_name_or_path": None}))
    calls.clear()
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _fail)
    with pytest.raises(ValueError, match="base_model_name_or_path is missing or null"):
        MixLoraModelForCausalLM.from_pretrained("someone/tiny-mixlora")
    assert [patterns for _, patterns, _ in calls] == [[CONFIG_NAME]], "the weights were downloaded"


def test_save_adapter_refuses_a_file_before_it_computes_anything(tmp_path, monkeypatch):
    model = inject_mixlora(tiny_model(), mixlora_config(), backend="torch")
    file = tmp_path / "taken"
    file.write_text("not an adapter")

    def fail(*args, **kwargs):
        raise AssertionError("save_adapter gathered the weights before checking the path")

    monkeypatch.setattr(adapter_module, "adapter_state_dict", fail)
    with pytest.raises(FileExistsError, match="is an existing file, not a directory") as err:
        save_adapter(model, file)
    assert repr(str(file)) in str(err.value)
    with pytest.raises(NotADirectoryError, match="is a file, not a directory") as err:
        save_adapter(model, file / "adapter")
    assert repr(str(file)) in str(err.value)
    assert file.read_text() == "not an adapter" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_the_loader_is_exported_from_the_integrations_package():
    from mixlora_kernels.integrations import MixLoraModelForCausalLM as from_integrations

    assert from_integrations is MixLoraModelForCausalLM


# --- where the base is, and what is checked before it loads -----------------------------


def _no_hub(monkeypatch) -> None:
    """Any Hub request fails the test (this machine has no network anyway: a request would
    only be slow)."""
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fail)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", _fail)


def _with_base(adapter: pathlib.Path, base: str | None) -> None:
    file = adapter / CONFIG_NAME
    file.write_text(json.dumps({**json.loads(file.read_text()), "base_model_name_or_path": base}))


def test_a_relative_base_as_the_readme_saves_it_loads_from_any_working_directory(tmp_path, monkeypatch):
    """The README saves the base to "tiny-llama" and the adapter to "my-adapter" in one
    directory; the adapter names its base "tiny-llama" and loads from anywhere."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    base = tiny_model()
    base.save_pretrained("tiny-llama")
    model = inject_mixlora(base, mixlora_config(base_model_name_or_path="tiny-llama"), backend="torch")
    randomize_adapter(model)
    save_adapter(model, "my-adapter")
    assert MixLoraConfig.from_pretrained(work / "my-adapter").base_model_name_or_path == "tiny-llama", "stored as given"

    monkeypatch.chdir(elsewhere)
    _no_hub(monkeypatch)
    loaded, config = MixLoraModelForCausalLM.from_pretrained(work / "my-adapter", backend="torch")
    assert config.base_model_name_or_path == "tiny-llama"
    assert loaded.name_or_path == str(work / "tiny-llama")
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # Relative to the working directory when the adapter's directories do not hold it.
    monkeypatch.chdir(work)
    (work / "adapters").mkdir()
    (work / "my-adapter").rename(work / "adapters" / "my-adapter")
    loaded, _ = MixLoraModelForCausalLM.from_pretrained("adapters/my-adapter", backend="torch")
    assert loaded.name_or_path == str(work / "tiny-llama")


@pytest.mark.parametrize(
    "base", ["/nowhere/tiny-llama", "./tiny-llama", "../tiny-llama", "models/llamas/tiny", "~/no-such-base", "a b"]
)
def test_a_local_base_that_does_not_exist_is_an_error_naming_the_field_and_the_paths(tmp_path, monkeypatch, base):
    adapter = _saved_adapter(tmp_path)
    _with_base(adapter, base)
    _no_download_or_build(monkeypatch)
    _no_hub(monkeypatch)
    with pytest.raises(FileNotFoundError, match="cannot be a Hub repository id") as err:
        MixLoraModelForCausalLM.from_pretrained(adapter)
    message = str(err.value)
    assert str(adapter / CONFIG_NAME) in message and f"base_model_name_or_path={base!r}" in message
    assert f"load_adapter(base, {str(adapter)!r})" in message and "Repo id must" not in message
    if not base.startswith(("/", "~")):  # relative: every place it was looked for is named
        for root in (adapter, tmp_path, pathlib.Path.cwd()):
            assert os.path.normpath(root / base) in message


def test_a_base_directory_without_a_config_is_refused(tmp_path, monkeypatch):
    adapter = _saved_adapter(tmp_path)
    (tmp_path / "base" / "config.json").unlink()
    _no_download_or_build(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"holds no config\.json") as err:
        MixLoraModelForCausalLM.from_pretrained(adapter)
    assert str(tmp_path / "base") in str(err.value) and str(adapter / CONFIG_NAME) in str(err.value)


def _cache_the_base(cache: pathlib.Path, repo: str, base_dir: pathlib.Path) -> None:
    """The Hugging Face cache layout of a downloaded repository, holding ``base_dir``'s files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in base_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())


def test_offline_a_hub_base_comes_from_the_local_cache_only(tmp_path, monkeypatch):
    adapter = _saved_adapter(tmp_path)
    _with_base(adapter, "someone/tiny-llama")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_hub(monkeypatch)
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1 is set") as err:
        MixLoraModelForCausalLM.from_pretrained(adapter, cache_dir=str(cache))
    message = str(err.value)
    assert "base_model_name_or_path='someone/tiny-llama'" in message and str(adapter / CONFIG_NAME) in message
    assert "local directory" in message and f"load_adapter(base, {str(adapter)!r})" in message

    _cache_the_base(cache, "someone/tiny-llama", tmp_path / "base")
    model, _ = MixLoraModelForCausalLM.from_pretrained(adapter, cache_dir=str(cache), backend="torch")
    expected = load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapter, backend="torch")
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected(input_ids=ids).logits)


def test_an_unreachable_hub_is_one_request_then_the_cache(tmp_path, monkeypatch):
    adapter = _saved_adapter(tmp_path)
    _with_base(adapter, "someone/tiny-llama")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    requests = []

    def unreachable(url, **kwargs):
        requests.append(url)
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fail)
    # Held in the cache, the base loads from there with no further request.
    cache = tmp_path / "cache"
    _cache_the_base(cache, "someone/tiny-llama", tmp_path / "base")
    model, _ = MixLoraModelForCausalLM.from_pretrained(adapter, cache_dir=str(cache), backend="torch")
    assert len(requests) == 1 and requests[0].endswith("someone/tiny-llama/resolve/main/config.json")
    assert len(mixlora_blocks(model)) == 2

    shutil.rmtree(cache)
    requests.clear()
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _fail)
    with pytest.raises(ConnectionError, match="the Hugging Face Hub cannot be reached") as err:
        MixLoraModelForCausalLM.from_pretrained(adapter, cache_dir=str(cache))
    assert len(requests) == 1
    assert "local directory" in str(err.value) and f"load_adapter(base, {str(adapter)!r})" in str(err.value)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(backend="cuda"), ValueError, r"backend='cuda': must be one of"),
        (dict(dtype="flot16"), ValueError, r"dtype='flot16' is not a dtype"),
        (dict(torch_dtype=3), ValueError, r"torch_dtype=3 is not a dtype"),
        (dict(dtype=torch.int8), ValueError, r"dtype=torch\.int8 is not a dtype"),
        (dict(dtype=torch.float16, torch_dtype=torch.float32), TypeError, "pass one"),
        (dict(device_mapp="cpu"), TypeError, r"'device_mapp' \(did you mean 'device_map'\?\)"),
        (dict(use_cach=False, bogus=1), TypeError, r"arguments 'bogus', 'use_cach' \(did you mean"),
    ],
    ids=["backend", "dtype-name", "dtype-int", "dtype-integer", "both-dtypes", "keyword", "keywords"],
)
def test_bad_arguments_are_refused_before_the_base_loads(tmp_path, monkeypatch, kwargs, error, match):
    adapter = _saved_adapter(tmp_path)
    _no_download_or_build(monkeypatch)
    with pytest.raises(error, match=match) as err:
        MixLoraModelForCausalLM.from_pretrained(adapter, **kwargs)
    if error is TypeError and "keyword" in str(err.value):
        assert "LlamaConfig" in str(err.value)


def test_loading_options_and_config_attributes_reach_the_base(tmp_path):
    """A loading option, a retired one that transformers still swallows
    (``low_cpu_mem_usage``, popped from a list), and a config attribute all pass."""
    adapter = _saved_adapter(tmp_path)
    model, _ = MixLoraModelForCausalLM.from_pretrained(
        adapter, dtype="float64", attn_implementation="eager", use_cache=False, low_cpu_mem_usage=True,
        backend="torch",
    )  # fmt: skip
    assert model.dtype == torch.float64 and model.config.use_cache is False
    assert model.config._attn_implementation == "eager"


def test_a_base_of_a_model_type_mixlora_cannot_take_is_refused_before_its_weights(tmp_path, monkeypatch):
    adapter = _saved_adapter(tmp_path)
    gpt2 = tmp_path / "gpt2"
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=4).save_pretrained(gpt2)
    _with_base(adapter, str(gpt2))
    _no_download_or_build(monkeypatch)
    with pytest.raises(ValueError, match="is a 'gpt2' model, which MixLoRA does not support"):
        MixLoraModelForCausalLM.from_pretrained(adapter)
