"""FlashMHF runtime: what models import (the core op, presets, the reference, dispatch).

Imports without optuna; the toolchain (codegen, cache) is loaded lazily where it can be.
"""

from flashmhf_runtime import reference
from flashmhf_runtime.dispatch import reset
from flashmhf_runtime.layer import FlashMHF
from flashmhf_runtime.op import flash_mhf
from flashmhf_runtime.presets import PRESETS, Preset, get_preset

__all__ = ["FlashMHF", "PRESETS", "Preset", "flash_mhf", "get_preset", "reference", "reset"]
