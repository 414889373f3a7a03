"""Shared test helpers: random inputs (never zeros), the float64 reference and the error measure."""

from __future__ import annotations

import torch

import flashmhf_runtime
from flashmhf_runtime import reference

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}
POISON = float("nan")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error; NaN anywhere in ``out`` gives inf (so poison is caught)."""
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref.double()).norm() / ref.double().norm()).item()


def core_inputs(tokens, h, h_kv, d_h, e, d_e, dtype, device="cpu", seed=None, lead=None, r_dtype=torch.float32):
    """Fresh random core inputs scaled like a trained layer: q ~ N(0,1), weights ~ N(0, 1/d_h)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    lead = lead or (tokens,)
    q = torch.randn(*lead, h, d_h, generator=g)
    k, u, v = (torch.randn(h_kv, e, d_e, d_h, generator=g) * d_h**-0.5 for _ in range(3))
    r = torch.softmax(torch.randn(*lead, h, e, generator=g), -1)
    return (
        q.to(device, dtype),
        *(w.to(device, dtype) for w in (k, u, v)),
        r.to(device, r_dtype),
    )


def reference_core(q, k, u, v, r) -> torch.Tensor:
    return reference.flash_mhf(*(t.double().cpu() for t in (q, k, u, v, r)))


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data starts 4 bytes past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 4, dtype=t.dtype, device=t.device)
    base = (-buf.data_ptr() // t.element_size()) % 4  # elements to the next 16-byte boundary
    view = buf[base + 1: base + 1 + t.numel()].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 == 4 and view.is_contiguous()
    return view


# Shapes the warp-specialized (Hopper) kinds are checked at on a GPU: (tokens, H, H_kv, d_h, E, d_e, dtype).
REPO_13B = (16, 16, 128, 22, 256)
REPO_128M = (8, 8, 96, 8, 256)  # d_h = 96: fwd_ws only, in column parts of 64 + 32
WS_GPU_CASES = [
    (77, *REPO_13B, torch.bfloat16),
    (1, *REPO_13B, torch.bfloat16),
    (300, 16, 4, 128, 22, 256, torch.bfloat16),  # 4 heads per kv head
    (1000, 8, 8, 64, 4, 384, torch.float16),  # d_e = 384, fp16
    (129, 4, 2, 32, 2, 64, torch.bfloat16),
]


# d_h = 96 (column parts of 64 + 32): odd token counts, shared kv heads, fp16 with d_e = 64.
DH96_GPU_CASES = [
    (77, *REPO_128M, torch.bfloat16),
    (1100, 8, 2, 96, 8, 256, torch.bfloat16),
    (300, 4, 4, 96, 3, 64, torch.float16),
]


def ws_case_id(case) -> str:
    return "T{}-H{}-kv{}-d{}-E{}x{}-{}".format(*case[:6], str(case[6])[6:])


def ws_spec(kind: str, case):
    """The Spec of ``kind`` for a (tokens, H, H_kv, d_h, E, d_e, torch dtype) case."""
    from flashmhf.codegen import Spec

    _, h, h_kv, d_h, e, d_e, dtype = case
    return Spec(kind, h, h_kv, d_h, e, d_e, "bf16" if dtype == torch.bfloat16 else "fp16")


def ws_gpu_runs(kind: str, configs) -> list:
    """pytest params (case, config): each case of WS_GPU_CASES and DH96_GPU_CASES with each of
    ``configs`` that the kind accepts for its shape (128-wide tiles of d_e = 64 do not fit)."""
    import pytest

    from flashmhf.codegen import get_kind

    return [pytest.param(case, config, id=ws_case_id(case) + "-" + "-".join(f"{k}{v}" for k, v in config.items()))
            for case in WS_GPU_CASES + DH96_GPU_CASES for config in configs
            if get_kind(kind).reject(ws_spec(kind, case), config, None) is None]


def pretend_gpu(monkeypatch, op_module, capability: str, name: str = "pretend-gpu") -> None:
    """Make ``op_module`` (flashmhf_runtime.op) see a GPU of this compute capability, outside the
    interpreter, called ``name`` (what its tuned results are filed under)."""
    from flashmhf.cache.device import DeviceInfo, device_info
    from flashmhf.codegen.arch import arch_for_capability

    here = device_info()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(op_module, "device_arch", lambda index: arch_for_capability(capability))
    monkeypatch.setattr(op_module, "device_info",
                        lambda index=None: DeviceInfo(name, capability, here.triton_version, here.torch_version))
    flashmhf_runtime.reset()


def isolated_caches(tmp_path, monkeypatch):
    """For an autouse fixture (``yield from``): an empty user cache folder, no overlay, no shipped
    files, and the runtime's memos cleared before and after the test."""
    from flashmhf.cache import paths

    monkeypatch.setenv("FLASHMHF_CACHE_DIR", str(tmp_path / "user"))
    monkeypatch.delenv("FLASHMHF_CACHE", raising=False)
    monkeypatch.setattr(paths, "shipped_cache_paths", lambda: [])
    flashmhf_runtime.reset()
    yield
    flashmhf_runtime.reset()
