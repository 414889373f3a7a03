"""Identity of the machine a tuning result belongs to: device, compute capability, compiler versions."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from functools import cache

from flashmhf.codegen.arch import Arch, arch_for_capability, with_device_limits

# Results measured under Triton's CPU interpreter carry this name, which no GPU can ever have.
INTERPRETER_DEVICE_NAME = "triton-interpreter-cpu"


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # normalised, e.g. "nvidia-h200"
    capability: str  # e.g. "9.0"; "0.0" for the interpreter
    triton_version: str
    torch_version: str

    @property
    def cuda_capability(self) -> tuple[int, int] | None:
        """(major, minor) of a CUDA device; None for the interpreter."""
        major, minor = (int(x) for x in self.capability.split("."))
        return None if (major, minor) == (0, 0) else (major, minor)

    def to_dict(self) -> dict:
        return asdict(self)


def normalise_device_name(raw: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'; 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _versions() -> tuple[str, str]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency on Linux
        triton_version = "none"
    return triton_version, torch.__version__.split("+")[0]


@cache
def device_info(index: int | None = None) -> DeviceInfo:
    """The identity of CUDA device ``index`` (default: current), or of the interpreter on CPU."""
    import torch

    triton_version, torch_version = _versions()
    if index is None and (interpreting() or not torch.cuda.is_available()):
        return DeviceInfo(INTERPRETER_DEVICE_NAME, "0.0", triton_version, torch_version)
    idx = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(idx)
    name = normalise_device_name(torch.cuda.get_device_name(idx))
    return DeviceInfo(name, f"{major}.{minor}", triton_version, torch_version)


@cache
def device_arch(index: int | None = None) -> Arch:
    """The architecture of CUDA device ``index`` (default: current), or the interpreter row under
    ``TRITON_INTERPRET=1`` / without a GPU: the table's row for its compute capability with the
    shared memory, SM count and registers the device reports about itself."""
    info = device_info(index)
    arch = arch_for_capability(info.cuda_capability)
    if arch.is_interpreter:
        return arch
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    return with_device_limits(
        arch,
        smem_per_block=getattr(props, "shared_memory_per_block_optin", None),
        sm_count=getattr(props, "multi_processor_count", None),
        regs_per_sm=getattr(props, "regs_per_multiprocessor", None),
    )
