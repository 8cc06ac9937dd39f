"""The package's environment variables, parsed in one place that imports neither triton
nor the kernels, so that every backend validates them the same way.

    MIXLORA_BACKEND        "auto", "torch" or "triton": what backend="auto" means
    MIXLORA_EXPERT_PASS    forces the Triton forward's organisation ("token_major" or
                           "expert_sorted")
    MIXLORA_EXPERT_BWD     forces the Triton backward's organisation (the same names)
    MIXLORA_TRITON_CONFIG  pins one kernel config, "BLOCK_T=32,BLOCK_F=64,num_warps=8"
    MIXLORA_TUNING_CACHE   the autotune cache directory, or "0"/"off" (any value is a path
                           or off, so there is nothing to refuse; see ``tuning.cache``)

``check_environment`` runs at the start of every call (``plan.plan_call``): a bad value
is an error whatever the backend, not only where the Triton path would have read it.
Only ``os.environ`` and string methods are used, which torch.compile traces without a
graph break.
"""

from __future__ import annotations

import os

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "MIXLORA_BACKEND"
ORGANISATIONS = ("token_major", "expert_sorted")
ORGANISATION_ENV = "MIXLORA_EXPERT_PASS"
BACKWARD_ENV = "MIXLORA_EXPERT_BWD"
PIN_ENV = "MIXLORA_TRITON_CONFIG"
CACHE_ENV = "MIXLORA_TUNING_CACHE"
# The names a pinned config may set: the block sizes of the kernels' configs
# (tuning.configs; a test keeps the two equal) and Triton's launch options.
CONFIG_NAMES = ("BLOCK_T", "BLOCK_M", "BLOCK_F", "num_warps", "num_stages")
# Every variable the package reads; a new one is added here, and to check_environment
# unless any value is valid.
VARIABLES = (BACKEND_ENV, ORGANISATION_ENV, BACKWARD_ENV, PIN_ENV, CACHE_ENV)


def forced(name: str) -> str:
    """The variable's value without surrounding blanks; "" when unset."""
    return os.environ.get(name, "").strip()


def forced_backend() -> str:
    """The backend MIXLORA_BACKEND asks "auto" to mean: "auto" when it is unset or empty."""
    backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={backend!r}: must be one of {BACKENDS}")
    return backend


def forced_organisation_name(name: str) -> str | None:
    """The organisation ``name`` (MIXLORA_EXPERT_PASS or MIXLORA_EXPERT_BWD) forces, or None."""
    value = forced(name)
    if not value:
        return None
    if value not in ORGANISATIONS:
        raise ValueError(f"{name}={value!r}: must be one of {ORGANISATIONS}")
    return value


def pinned_config() -> dict | None:
    """The config pinned by MIXLORA_TRITON_CONFIG, e.g. "BLOCK_T=32,BLOCK_F=64,num_warps=8"."""
    spec = forced(PIN_ENV)
    if not spec:
        return None
    out = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"{PIN_ENV}={spec!r}: expected comma-separated NAME=INT items")
        out[key.strip()] = int(value)
    return out


def check_environment() -> None:
    """Raise ValueError naming the first MIXLORA_* variable whose value is invalid, a
    pinned config that names no config field (``BLOK_T=32``) included: the kernels would
    ignore it."""
    forced_backend()
    forced_organisation_name(ORGANISATION_ENV)
    forced_organisation_name(BACKWARD_ENV)
    unknown = sorted(set(pinned_config() or {}) - set(CONFIG_NAMES))
    if unknown:
        names = ", ".join(unknown)
        raise ValueError(f"{PIN_ENV}={forced(PIN_ENV)!r}: {names} is no config field; the fields: {CONFIG_NAMES}")
