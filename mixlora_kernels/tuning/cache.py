"""Autotune choices kept on disk, so that a config is tuned once per (device, kernel,
shape bucket) rather than once per process.

Triton's own ``cache_results`` does not fit: it serialises the configs to JSON (ours carry
a ``families`` frozenset), keys on the architecture rather than the device, and its format
is internal to each Triton version. This cache reads only what the Autotuner exposes in
every supported version (>= 3.6): ``keys`` and ``best_config``.

One JSON file per (device, Triton version, kernel, fingerprint) under the cache directory;
the fingerprint hashes the kernel's source and its config list, so that editing either
starts a new file. A file maps a launch key (the autotune key values and the tensor
dtypes) to the chosen config and the seconds its tuning took.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import triton

from ..environment import CACHE_ENV

# Values of CACHE_ENV that turn the disk cache off (choices are still kept in memory).
_DISABLED = ("", "0", "off")


@dataclasses.dataclass(frozen=True)
class Choice:
    """A tuned config as a direct kernel launch takes it."""

    kwargs: dict
    num_warps: int
    num_stages: int
    tuning_seconds: float

    def launch_kwargs(self) -> dict:
        return dict(self.kwargs, num_warps=self.num_warps, num_stages=self.num_stages)


@dataclasses.dataclass(frozen=True)
class TuningEvent:
    """Where one launch got its config from. ``seconds`` is what the launch waited for it
    (compiling and timing every candidate when "tuned", reading the file when "disk");
    ``tuning_seconds`` is what tuning that entry took when it was tuned."""

    kernel: str
    key: str
    seconds: float
    source: str
    tuning_seconds: float


class TuningLog:
    """The tuning events since the last reset: the benchmark's tuning report."""

    def __init__(self) -> None:
        self._events: list[TuningEvent] = []

    def record(self, event: TuningEvent) -> None:
        self._events.append(event)

    def events(self) -> list[TuningEvent]:
        return list(self._events)

    def reset(self) -> None:
        self._events.clear()


TUNING_LOG = TuningLog()


def tuning_events() -> list[TuningEvent]:
    """Configs tuned or read from disk since the last reset, by the caches that log to the
    shared log (the default cache does)."""
    return TUNING_LOG.events()


def reset_tuning_events() -> None:
    TUNING_LOG.reset()


def default_directory() -> Path | None:
    """The cache directory the environment names: MIXLORA_TUNING_CACHE, or
    $XDG_CACHE_HOME/mixlora_kernels/autotune (~/.cache/... when unset). None when the
    variable is "0", "off" or empty: the disk cache is off."""
    return _directory(os.environ.get(CACHE_ENV), os.environ.get("XDG_CACHE_HOME"))


def _directory(setting: str | None, xdg_cache_home: str | None) -> Path | None:
    if setting is not None:
        return None if setting.strip().lower() in _DISABLED else Path(setting).expanduser()
    # The XDG spec treats an empty XDG_CACHE_HOME as unset.
    base = Path(xdg_cache_home) if xdg_cache_home else Path.home() / ".cache"
    return base / "mixlora_kernels" / "autotune"


def default_cache() -> TuningCache:
    """The cache launches use unless given one: one per directory the environment names,
    so that a changed MIXLORA_TUNING_CACHE takes effect at the next launch."""
    return _cache_for(os.environ.get(CACHE_ENV), os.environ.get("XDG_CACHE_HOME"))


@functools.cache
def _cache_for(setting: str | None, xdg_cache_home: str | None) -> TuningCache:
    return TuningCache(_directory(setting, xdg_cache_home))


def launch_key(keys: Sequence[str], args: dict) -> str:
    """What one tuned choice is valid for, as a deterministic string: the values of the
    autotune key arguments in key order, then the dtypes of the tensor arguments sorted by
    name (the Autotuner keys on the dtypes too)."""
    values = ",".join(f"{name}={_key_value(args[name])}" for name in keys if name in args)
    dtypes = ",".join(
        f"{name}={_dtype_name(value.dtype)}" for name, value in sorted(args.items()) if isinstance(value, torch.Tensor)
    )
    return f"{values};{dtypes}"


def _key_value(value) -> str:
    if isinstance(value, torch.Tensor):
        return _dtype_name(value.dtype)
    if isinstance(value, torch.dtype):
        return _dtype_name(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return json.dumps(value)
    # repr() of other objects may hold a memory address: the key would differ per process.
    raise TypeError(f"autotune key value {value!r} ({type(value).__name__}) has no stable text form")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._+-]+", "-", text.lower()).strip("-.")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _kernel_source(kernel) -> str:
    """The kernel's source and that of the jit helpers it may call: the whole file it is
    defined in and the kernels' shared file (common.py), so that editing a helper starts a
    new cache file too."""
    fn = getattr(kernel, "fn", None)
    path = None if fn is None else inspect.getsourcefile(fn)
    if path is None:
        return getattr(kernel, "src", None) or inspect.getsource(fn)
    shared = Path(__file__).resolve().parent.parent / "kernels" / "common.py"
    return "".join(Path(p).read_text(encoding="utf-8") for p in (path, shared))


@dataclasses.dataclass(frozen=True)
class _KernelId:
    """A kernel and its config list as the file name records them."""

    name: str
    source_hash: str
    configs_hash: str

    @classmethod
    def of(cls, kernel, configs: Sequence[triton.Config]) -> _KernelId:
        source = _kernel_source(kernel)
        # The families decide which configs a device may pick, so they belong to the space.
        space = [
            (sorted(c.kwargs.items()), c.num_warps, c.num_stages, sorted(getattr(c, "families", ()))) for c in configs
        ]
        return cls(kernel.__name__, _short_hash(source), _short_hash(repr(space)))


class TuningCache:
    """Tuned configs in memory and, unless ``directory`` is None, on disk.

    ``device`` labels the files; by default the current CUDA device's name and compute
    capability. ``triton_version`` defaults to the installed one. Events go to ``log``,
    by default the shared log that ``tuning_events()`` reads."""

    def __init__(
        self,
        directory: str | os.PathLike | None,
        *,
        device: str | None = None,
        triton_version: str | None = None,
        log: TuningLog | None = None,
    ) -> None:
        self.directory = None if directory is None else Path(directory)
        self.device = device
        self.triton_version = triton.__version__ if triton_version is None else triton_version
        self.log = TUNING_LOG if log is None else log
        self._memory: dict[tuple[str, _KernelId, str], Choice] = {}
        # Keyed by id(): the stored kernel and configs keep the ids from being reused.
        self._kernels: dict[tuple[int, int], tuple[object, object, _KernelId]] = {}
        self._devices: dict[int, str] = {}
        self._warned: set[str] = set()

    def launch(self, kernel, autotuned, configs: Sequence[triton.Config], grid, args: dict) -> None:
        """Launch ``kernel`` with the config tuned for this launch's key: from memory, from
        disk, or else by running ``autotuned`` now and storing its choice."""
        kid = self._kernel_id(kernel, configs)
        device = self._device()
        key = launch_key(autotuned.keys, args)
        choice = self._memory.get((device, kid, key))
        if choice is None:
            path = self._path(device, kid)
            start = time.perf_counter()
            choice = self._read(path).get(key)
            if choice is None:
                self._memory[device, kid, key] = self._tune(autotuned, grid, args, device, kid, key, path)
                return
            self.log.record(TuningEvent(kid.name, key, time.perf_counter() - start, "disk", choice.tuning_seconds))
            self._memory[device, kid, key] = choice
        kernel[grid](**args, **choice.launch_kwargs())

    def _path(self, device: str, kid: _KernelId) -> Path | None:
        if self.directory is None:
            return None
        name = ".".join(
            [_slug(device), _slug(f"triton-{self.triton_version}"), _slug(kid.name.lstrip("_")),
             f"{kid.source_hash}-{kid.configs_hash}", "json"]
        )  # fmt: skip
        return self.directory / name

    def _kernel_id(self, kernel, configs) -> _KernelId:
        entry = self._kernels.get((id(kernel), id(configs)))
        if entry is None:
            entry = self._kernels[id(kernel), id(configs)] = (kernel, configs, _KernelId.of(kernel, configs))
        return entry[2]

    def _device(self) -> str:
        if self.device is not None:
            return self.device
        # Triton launches on the current device, whatever device the tensors name.
        index = torch.cuda.current_device()
        label = self._devices.get(index)
        if label is None:
            major, minor = torch.cuda.get_device_capability(index)
            label = self._devices[index] = f"{torch.cuda.get_device_name(index)} sm{major}{minor}"
        return label

    def _tune(self, autotuned, grid, args: dict, device: str, kid: _KernelId, key: str, path: Path | None) -> Choice:
        # The wall time a user waits: compiling and timing every candidate, then the launch.
        _synchronize()
        start = time.perf_counter()
        autotuned[grid](**args)
        _synchronize()
        seconds = time.perf_counter() - start
        best = autotuned.best_config
        choice = Choice(dict(best.kwargs), int(best.num_warps), int(best.num_stages), seconds)
        self.log.record(TuningEvent(kid.name, key, seconds, "tuned", seconds))
        if path is not None:
            self._write(path, key, choice, device, kid)
        return choice

    def _read(self, path: Path | None) -> dict[str, Choice]:
        """The entries of a cache file; a missing file has none, an unreadable or corrupt
        one is ignored (and overwritten at the next write) with one warning."""
        if path is None:
            return {}
        try:
            with open(path, encoding="utf-8") as f:
                entries = json.load(f)["entries"]
            return {key: _choice(entry) for key, entry in entries.items()}
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            self._warn_once(str(path), f"mixlora_kernels: ignoring the autotune cache file {path}: {err!r}")
            return {}

    def _write(self, path: Path, key: str, choice: Choice, device: str, kid: _KernelId) -> None:
        """Add one entry to the file, atomically, keeping what other processes wrote."""
        entries = {k: dataclasses.asdict(c) for k, c in self._read(path).items()}
        entries[key] = dataclasses.asdict(choice)
        document = {"kernel": kid.name, "device": device, "triton": self.triton_version, "entries": entries}
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(document, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as err:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            self._warn_once(
                str(path.parent),
                f"mixlora_kernels: cannot write the autotune cache in {path.parent} ({err!r}); "
                "tuned configs are kept in memory for this process only",
            )

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, UserWarning, stacklevel=4)


def _choice(entry: dict) -> Choice:
    if not isinstance(entry["kwargs"], dict):
        raise TypeError(f"kwargs is {type(entry['kwargs']).__name__}, not a dict")
    return Choice(
        dict(entry["kwargs"]), int(entry["num_warps"]), int(entry["num_stages"]), float(entry["tuning_seconds"])
    )


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
