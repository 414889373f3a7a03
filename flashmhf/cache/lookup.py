"""Runtime lookup of tuned configs (placeholder until the cache lands: always a miss)."""

from __future__ import annotations

from flashmhf.cache.device import DeviceInfo
from flashmhf.codegen import Config, Spec


def find_config(spec: Spec, tokens: int, device: DeviceInfo) -> tuple[Config, str] | None:
    """Best cached config for (spec, token bucket, device) and a description of where it came from."""
    return None


def demote(spec: Spec, tokens: int, device: DeviceInfo, config: Config, reason: str) -> None:
    """Stop using ``config`` for this key in this process (it failed to compile or run)."""
