"""What the benchmark modules share: argument parsers, the output folder, preset specs, and an
empty user cache for runs that must see only the shipped (or ``FLASHMHF_CACHE``) results."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from flashmhf.codegen import Spec
from flashmhf_runtime import get_preset


def argument_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose usage line reads ``python -m <module>`` and whose help is the module's docstring."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def out_dir() -> Path:
    """Where JSON results go: ``$OUT`` if set (created if needed), else the current directory."""
    path = Path(os.environ.get("OUT") or ".")
    path.mkdir(parents=True, exist_ok=True)
    return path


def preset_spec(kind: str, preset: str, dtype: str = "bf16") -> Spec:
    """The spec of kernel ``kind`` for the layer shape of ``preset``."""
    return Spec(kind, *get_preset(preset).shape, dtype)


def use_empty_user_cache() -> Path:
    """Point ``FLASHMHF_CACHE_DIR`` at a new temporary folder (unless it is set already), so that this
    process and its workers read only ``FLASHMHF_CACHE`` and the shipped caches, never the user's own
    tuning results. Call before the first config lookup."""
    if not os.environ.get("FLASHMHF_CACHE_DIR"):
        os.environ["FLASHMHF_CACHE_DIR"] = tempfile.mkdtemp(prefix="flashmhf-empty-user-cache-")
    return Path(os.environ["FLASHMHF_CACHE_DIR"])


def host_us(fn: Callable[[], object], calls: int = 200, repeats: int = 15, warmup: int = 50) -> float:
    """Median host time per call in µs: `calls` calls back to back, no sync inside (the launch queue
    absorbs them), synchronised between repeats."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)
