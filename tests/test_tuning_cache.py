"""The on-disk cache of autotune choices, on CPU with test doubles for the Triton kernel
and its Autotuner: what is tuned, what is read back, what invalidates an entry, and that
a broken cache file or directory costs a warning, never a launch."""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch
import triton

from mixlora_kernels.backends.triton.common import launch
from mixlora_kernels.environment import PIN_ENV
from mixlora_kernels.tuning.cache import (
    CACHE_ENV,
    TuningCache,
    TuningLog,
    default_directory,
    launch_key,
    reset_tuning_events,
    tuning_events,
)

GRID = (3, 1)
KEYS = ("F", "T_BUCKET")
TUNE_SECONDS = 0.02


def make_configs(warps: int = 8) -> list[triton.Config]:
    configs = [
        triton.Config({"BLOCK": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK": 32}, num_warps=warps, num_stages=2),
    ]
    # As tuning.configs tags them: a frozenset that a JSON serialisation of the config chokes on.
    for c in configs:
        c.families = frozenset({"sm_80", "sm_90"})
    return configs


class FakeKernel:
    """A JITFunction stand-in: ``kernel[grid](**kwargs)`` records a direct launch."""

    def __init__(self, src: str = "def _fake_fwd_kernel(x_ptr, F, T_BUCKET, BLOCK): pass") -> None:
        self.__name__ = "_fake_fwd_kernel"
        self.src = src
        self.calls: list[tuple] = []

    def __getitem__(self, grid):
        return lambda **kwargs: self.calls.append((grid, kwargs))


class FakeAutotuned:
    """An Autotuner stand-in: a run takes TUNE_SECONDS and sets ``best_config`` to ``best``."""

    def __init__(self, best: triton.Config) -> None:
        self.keys = KEYS
        self.best = best
        self.best_config = None
        self.runs: list[tuple] = []

    def __getitem__(self, grid):
        def run(**kwargs):
            time.sleep(TUNE_SECONDS)
            self.runs.append((grid, kwargs))
            self.best_config = self.best

        return run


# Shared so that recorded launches compare equal to fresh make_args() (dict equality tests
# tensors by identity first; == on two tensors is elementwise).
TENSORS = {dtype: torch.zeros(4, dtype=dtype) for dtype in (torch.float16, torch.float32)}


def make_args(F: int = 64, dtype: torch.dtype = torch.float16, T: int = 5) -> dict:
    return dict(x_ptr=TENSORS[dtype], h_ptr=TENSORS[torch.float32], F=F, T=T, T_BUCKET=8)


def json_files(directory) -> list:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def cache_at(directory, **kwargs) -> TuningCache:
    return TuningCache(directory, device=kwargs.pop("device", "fake-device"), log=TuningLog(), **kwargs)


def tune_once(directory, **kwargs) -> TuningCache:
    """A cache that has tuned make_args() into ``directory`` (a first process)."""
    configs = make_configs()
    cache = cache_at(directory, **kwargs)
    cache.launch(FakeKernel(), FakeAutotuned(configs[1]), configs, GRID, make_args())
    return cache


def test_first_launch_tunes_writes_the_file_and_later_launches_go_direct(tmp_path):
    configs, kernel = make_configs(), FakeKernel()
    tuner = FakeAutotuned(configs[1])
    cache = cache_at(tmp_path)
    cache.launch(kernel, tuner, configs, GRID, make_args())
    assert tuner.runs == [(GRID, make_args())]
    assert kernel.calls == []
    (path,) = json_files(tmp_path)
    assert "fake-device" in path.name and f"triton-{triton.__version__}" in path.name and "fake_fwd_kernel" in path.name
    entries = json.loads(path.read_text())["entries"]
    assert list(entries) == [launch_key(KEYS, make_args())]
    (entry,) = entries.values()
    assert (entry["kwargs"], entry["num_warps"], entry["num_stages"]) == ({"BLOCK": 32}, 8, 2)
    assert entry["tuning_seconds"] >= TUNE_SECONDS

    # Same key, another token count in the same bucket: the stored config, no tuning.
    cache.launch(kernel, tuner, configs, GRID, make_args(T=7))
    assert len(tuner.runs) == 1
    assert kernel.calls == [(GRID, {**make_args(T=7), "BLOCK": 32, "num_warps": 8, "num_stages": 2})]


def test_a_new_process_reads_the_file_and_launches_without_tuning(tmp_path):
    tune_once(tmp_path)
    configs, kernel = make_configs(), FakeKernel()
    # This Autotuner would pick the other config: a launch with BLOCK=32 came from the file.
    tuner = FakeAutotuned(configs[0])
    cache_at(tmp_path).launch(kernel, tuner, configs, GRID, make_args())
    assert tuner.runs == []
    assert kernel.calls == [(GRID, {**make_args(), "BLOCK": 32, "num_warps": 8, "num_stages": 2})]


@pytest.mark.parametrize(
    "change", [dict(F=128), dict(dtype=torch.float32)], ids=["another-key-value", "another-dtype"]
)  # fmt: skip
def test_a_different_key_tunes_again_and_both_entries_stay(tmp_path, change):
    tune_once(tmp_path)
    configs = make_configs()
    tuner = FakeAutotuned(configs[0])
    cache_at(tmp_path).launch(FakeKernel(), tuner, configs, GRID, make_args(**change))
    assert len(tuner.runs) == 1
    (path,) = json_files(tmp_path)
    entries = json.loads(path.read_text())["entries"]
    assert entries[launch_key(KEYS, make_args())]["kwargs"] == {"BLOCK": 32}
    assert entries[launch_key(KEYS, make_args(**change))]["kwargs"] == {"BLOCK": 16}


@pytest.mark.parametrize(
    "other", [dict(device="other-device"), dict(triton_version="3.6.0-other")], ids=["device", "triton-version"]
)  # fmt: skip
def test_another_device_or_triton_version_does_not_reuse_the_entry(tmp_path, other):
    tune_once(tmp_path)
    configs = make_configs()
    tuner = FakeAutotuned(configs[0])
    cache_at(tmp_path, **other).launch(FakeKernel(), tuner, configs, GRID, make_args())
    assert len(tuner.runs) == 1
    assert len(json_files(tmp_path)) == 2


@pytest.mark.parametrize(
    "kernel, configs",
    [
        (lambda: FakeKernel(src="def _fake_fwd_kernel(x_ptr, F, T_BUCKET, BLOCK): return"), make_configs),
        (FakeKernel, lambda: make_configs(warps=4)),
        (FakeKernel, lambda: [*make_configs(), triton.Config({"BLOCK": 64}, num_warps=8, num_stages=3)]),
    ],
    ids=["kernel-source", "config-warps", "config-added"],
)
def test_a_changed_kernel_or_config_list_invalidates(tmp_path, kernel, configs):
    tune_once(tmp_path)
    configs = configs()
    tuner = FakeAutotuned(configs[0])
    launched = kernel()
    cache_at(tmp_path).launch(launched, tuner, configs, GRID, make_args())
    assert len(tuner.runs) == 1 and launched.calls == []


@pytest.mark.parametrize(
    "content", ["{not json", "[1, 2]", '{"entries": {"k": {"kwargs": 3}}}', '{"entries": 1}'],
    ids=["not-json", "a-list", "bad-entry", "bad-entries"],
)  # fmt: skip
def test_a_corrupt_file_warns_once_and_is_retuned_and_rewritten(tmp_path, content):
    tune_once(tmp_path)
    (path,) = json_files(tmp_path)
    path.write_text(content)
    configs = make_configs()
    tuner = FakeAutotuned(configs[1])
    cache = cache_at(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache.launch(FakeKernel(), tuner, configs, GRID, make_args())
        cache.launch(FakeKernel(), tuner, configs, GRID, make_args(F=128))
    assert len(caught) == 1 and str(path) in str(caught[0].message)
    assert len(tuner.runs) == 2
    entries = json.loads(path.read_text())["entries"]
    assert sorted(entries) == sorted(launch_key(KEYS, make_args(F=F)) for F in (64, 128))


def test_an_unwritable_directory_warns_once_and_keeps_choices_in_memory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    configs, kernel = make_configs(), FakeKernel()
    tuner = FakeAutotuned(configs[1])
    cache = cache_at(blocker / "autotune")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache.launch(kernel, tuner, configs, GRID, make_args())
        cache.launch(kernel, tuner, configs, GRID, make_args(F=128))
        cache.launch(kernel, tuner, configs, GRID, make_args())
    assert len(caught) == 1 and "cannot write the autotune cache" in str(caught[0].message)
    assert len(tuner.runs) == 2
    assert kernel.calls == [(GRID, {**make_args(), "BLOCK": 32, "num_warps": 8, "num_stages": 2})]
    assert json_files(tmp_path) == [blocker]


@pytest.mark.parametrize("setting", ["0", "off", "OFF", ""])
def test_a_disabled_disk_cache_writes_nothing_and_still_remembers(tmp_path, monkeypatch, setting):
    monkeypatch.setenv(CACHE_ENV, setting)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_directory() is None
    configs, kernel = make_configs(), FakeKernel()
    tuner = FakeAutotuned(configs[1])
    cache = cache_at(default_directory())
    cache.launch(kernel, tuner, configs, GRID, make_args())
    cache.launch(kernel, tuner, configs, GRID, make_args())
    assert len(tuner.runs) == 1 and len(kernel.calls) == 1
    assert json_files(tmp_path) == []


def test_the_default_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_directory() == tmp_path / "xdg" / "mixlora_kernels" / "autotune"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_directory() == tmp_path / "home" / ".cache" / "mixlora_kernels" / "autotune"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert default_directory() == tmp_path / "mine"
    tune_once(default_directory())
    assert len(json_files(tmp_path / "mine")) == 1


def test_events_report_tuned_then_disk_with_their_seconds(tmp_path):
    log = TuningLog()
    configs = make_configs()
    first = TuningCache(tmp_path, device="fake-device", log=log)
    first.launch(FakeKernel(), FakeAutotuned(configs[1]), configs, GRID, make_args())
    first.launch(FakeKernel(), FakeAutotuned(configs[1]), configs, GRID, make_args())
    TuningCache(tmp_path, device="fake-device", log=log).launch(
        FakeKernel(), FakeAutotuned(configs[1]), configs, GRID, make_args()
    )
    tuned, disk = log.events()  # the in-memory hit is not an event
    key = launch_key(KEYS, make_args())
    assert (tuned.kernel, tuned.key, tuned.source) == ("_fake_fwd_kernel", key, "tuned")
    assert tuned.seconds >= TUNE_SECONDS and tuned.tuning_seconds == tuned.seconds
    assert (disk.kernel, disk.key, disk.source) == ("_fake_fwd_kernel", key, "disk")
    assert 0 <= disk.seconds < TUNE_SECONDS and disk.tuning_seconds == tuned.seconds
    log.reset()
    assert log.events() == []


def test_the_shared_log_reports_the_caches_that_log_to_it(tmp_path):
    reset_tuning_events()
    configs = make_configs()
    TuningCache(tmp_path, device="fake-device").launch(
        FakeKernel(), FakeAutotuned(configs[1]), configs, GRID, make_args()
    )
    assert [e.source for e in tuning_events()] == ["tuned"]
    reset_tuning_events()
    assert tuning_events() == []


def test_launch_keys_are_deterministic_and_json_friendly():
    a = dict(b_ptr=torch.zeros(1, dtype=torch.float16), F=64, a_ptr=torch.zeros(1), HAS_U=True, T_BUCKET=8)
    b = dict(reversed(list(a.items())))
    key = launch_key(["F", "T_BUCKET", "HAS_U", "MISSING"], a)
    assert key == launch_key(["F", "T_BUCKET", "HAS_U", "MISSING"], b)
    assert key == "F=64,T_BUCKET=8,HAS_U=true;a_ptr=float32,b_ptr=float16"
    assert json.loads(json.dumps({key: 1})) == {key: 1}
    with pytest.raises(TypeError, match="no stable text form"):
        launch_key(["F"], dict(F=object()))


def test_launch_uses_the_cache_only_when_no_config_is_fixed(tmp_path, monkeypatch):
    monkeypatch.delenv(PIN_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    configs, kernel = make_configs(), FakeKernel()
    tuner = FakeAutotuned(configs[1])
    launch(kernel, tuner, configs, GRID, make_args(), cache=cache_at(tmp_path / "autotuned"))
    assert len(tuner.runs) == 1 and len(json_files(tmp_path)) == 1

    # Under the interpreter: the first config, no tuning, no file.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launch(kernel, tuner, configs, GRID, make_args(), cache=cache_at(tmp_path / "interpreted"))
    assert kernel.calls[-1] == (GRID, {**make_args(), "BLOCK": 16, "num_warps": 4, "num_stages": 1})

    # Pinned: the pinned values over the first config, no tuning, no file.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(PIN_ENV, "BLOCK=64")
    launch(kernel, tuner, configs, GRID, make_args(), cache=cache_at(tmp_path / "pinned"))
    assert kernel.calls[-1] == (GRID, {**make_args(), "BLOCK": 64, "num_warps": 4, "num_stages": 1})
    assert len(tuner.runs) == 1 and len(json_files(tmp_path)) == 1
