"""Compile a generated kernel for an NVIDIA target without a GPU and report what it uses.

Triton compiles ahead of time for any target it knows, and its wheel bundles ptxas. So on a laptop
or in CI we can see, for one spec and config, what the GPU will run: registers per thread, bytes
spilled to local memory, shared memory, and which tensor-core instructions each ``tl.dot`` became
(MMA v3 = Hopper's asynchronous warpgroup MMA; v2 = the older synchronous mma.sync). Spills and v2
instructions on a Hopper target are the usual reasons for a slow backward, so this is how kernel
changes are checked before spending GPU time (``flashmhf show --resources``).

The launch arguments are captured by running the rendered module's own ``launch`` on CPU tensors
with its kernels' ``run`` replaced by a recorder, so the report covers exactly what a launch passes.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from flashmhf.codegen import Spec, get_kind, load
from flashmhf.codegen.arch import arch_for_capability
from flashmhf.tuner.harness import make_problem

_TL_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
             torch.int64: "i64"}


@dataclass(frozen=True)
class KernelReport:
    """What one compiled kernel launch uses on the target."""

    name: str
    registers: int | None  # per thread
    spill_bytes: int | None  # stores to local memory per thread
    shared_bytes: int
    mma: tuple[str, ...]  # e.g. "v3 warps [4, 1] instr [16, 64, 16]"
    constexprs: dict = field(default_factory=dict)
    # PTX instructions of the special-function unit (and divisions, which use it), by name, as
    # written in the code: the gates' SiLU is the elementwise work between their MMAs.
    special: dict = field(default_factory=dict)

    @property
    def uses_mma_v2(self) -> bool:
        return any(m.startswith("v2") for m in self.mma)


@dataclass
class _Launch:
    kernel: object
    args: tuple
    kwargs: dict


def capture_launches(spec: Spec, config: dict, tokens: int, module: ModuleType | None = None) -> list[_Launch]:
    """Run the launch of ``module`` (default: the current render of ``spec``) on small-but-real CPU
    tensors, recording each kernel launch instead of running it."""
    mod = load(spec) if module is None else module
    kernels = [obj for obj in vars(mod).values() if hasattr(obj, "arg_names") and hasattr(obj, "run")]
    launches: list[_Launch] = []
    saved = {k: k.run for k in kernels}
    try:
        for k in kernels:
            def record(*args, _k=k, grid=None, warmup=False, **kwargs):
                launches.append(_Launch(_k, args, kwargs))
            k.run = record
        problem = make_problem(spec, tokens, "cpu", seed=0, with_reference=False)
        mod.launch(*problem.args, **config)
    finally:
        for k, run in saved.items():
            k.run = run
    return launches


def _type_string(value) -> str:
    from triton.tools.tensor_descriptor import TensorDescriptor

    if type(value).__module__.startswith("triton.experimental.gluon"):  # a descriptor with its smem layout
        from triton.runtime.jit import mangle_type

        return mangle_type(value)
    if isinstance(value, torch.Tensor):
        return "*" + _TL_NAMES[value.dtype]
    if isinstance(value, TensorDescriptor):
        return f"tensordesc<{_TL_NAMES[value.base.dtype]}{list(value.block_shape)}>"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type launch argument {value!r}")


_SPECIAL = re.compile(r"\b(tanh\.approx|ex2\.approx|rcp\.approx|rcp\.rn|div\.rn|div\.full|div\.approx)\.")


def special_function_counts(ptx: str) -> dict[str, int]:
    """How many instructions of each special-function kind the PTX contains (static count)."""
    counts: dict[str, int] = {}
    for m in _SPECIAL.finditer(ptx):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return dict(sorted(counts.items()))


def _ptxas_info(ptx: str, arch: str) -> tuple[int | None, int | None]:
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-v", f"-arch={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=False)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None)


def specialisation(launch: _Launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, launch options) of a recorded launch: with the kernel's source, what
    Triton compiles it for."""
    fn = launch.kernel
    kwargs = dict(launch.kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    values = dict(zip(fn.arg_names, launch.args))
    values.update(kwargs)
    signature, constexprs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = values[name]
        else:
            signature[name] = _type_string(values[name])
    return signature, constexprs, options


def _compile(launch: _Launch, capability: int) -> KernelReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    signature, constexprs, options = specialisation(launch)
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(fn, signature, constexprs=constexprs)
    else:
        src = ASTSource(fn, signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    mma = tuple(sorted({
        f"v{major} warps {warps} instr {instr}"
        for major, warps, instr in re.findall(
            r"versionMajor = (\d+)[^>]*?warpsPerCTA = (\[[^\]]*\]), instrShape = (\[[^\]]*\])", compiled.asm["ttgir"])
    }))
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"  # the a-variants have wgmma/tcgen05
    regs, spills = _ptxas_info(compiled.asm["ptx"], arch)
    return KernelReport(fn.__name__, regs, spills, compiled.metadata.shared, mma,
                        {fn.arg_names[i[0]]: v for i, v in constexprs.items()},
                        special_function_counts(compiled.asm["ptx"]))


def kernel_resources(
    spec: Spec, config: dict, tokens: int = 4096, capability: int = 90, check: bool = True
) -> list[KernelReport]:
    """Compile every kernel one launch of ``spec`` with ``config`` runs, for compute capability
    ``capability`` (90 = H100/H200), and report each one's resources. Needs no GPU. ``check=False``
    skips the kind's constraints for that architecture (to see what a rejected config would really use)."""
    if check:
        get_kind(spec.kind).check_config(spec, config, None, arch_for_capability(capability))
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("resource reports compile real kernels: unset TRITON_INTERPRET")
    return [_compile(launch, capability) for launch in capture_launches(spec, config, tokens)]
