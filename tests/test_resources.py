"""Compile reports for a GPU target, made on this CPU (`flashmhf show --resources`).

The tests run in a subprocess without TRITON_INTERPRET (the suite's interpreter mode would turn the
kernels into interpreted functions). They pin the properties the backward's speed rests on: the
default bwd_dkuv tiles compile to Hopper warpgroup MMAs with no register spills."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import json, sys
from flashmhf.codegen import Spec, get_kind
from flashmhf.tuner.resources import kernel_resources
spec = Spec(*json.loads(sys.argv[1]))
config = json.loads(sys.argv[2]) or get_kind(spec.kind).default(spec, 16384)
print(json.dumps([dict(name=r.name, registers=r.registers, spills=r.spill_bytes, shared=r.shared_bytes,
                       mma=list(r.mma), v2=r.uses_mma_v2, special=r.special)
                  for r in kernel_resources(spec, config, tokens=256)]))
"""


def _run_compiling(*args: str) -> str:
    """Run ``python args…`` without TRITON_INTERPRET (so kernels really compile); its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _report(spec: list, config: dict | None = None) -> list[dict]:
    out = _run_compiling("-c", _SCRIPT, json.dumps(spec), json.dumps(config or {}))
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_default_dkuv_uses_warpgroup_mma_without_spills():
    [kernel] = _report(["bwd_dkuv", 16, 16, 128, 22, 256, "bf16"])  # repo-1.3b: one kernel
    assert kernel["name"] == "flashmhf_bwd_dkuv"
    assert kernel["mma"] and not kernel["v2"], kernel["mma"]
    assert kernel["spills"] == 0 and 0 < kernel["registers"] <= 255, kernel
    assert 0 < kernel["shared"] <= 232_448


@pytest.mark.slow
def test_split_dkuv_reports_both_kernels_and_narrow_tiles_fall_back_to_mma_v2():
    split = dict(block_f=64, block_m=32, num_warps=4, num_stages=3, split_dv=1, rows_major=0)
    kernels = _report(["bwd_dkuv", 16, 16, 128, 22, 256, "bf16"], split)
    assert [k["name"] for k in kernels] == ["flashmhf_bwd_dkuv"] * 2
    assert all(not k["v2"] for k in kernels)
    # A 32-row d_ff tile is too short for a warpgroup MMA (64 rows): the report must say so.
    narrow = dict(block_f=32, block_m=64, num_warps=4, num_stages=3, split_dv=0, rows_major=0)
    [kernel] = _report(["bwd_dkuv", 16, 16, 128, 22, 256, "bf16"], narrow)
    assert kernel["v2"], kernel["mma"]


def test_show_resources_cli_reports_registers():
    out = _run_compiling("-m", "flashmhf.cli", "show", "--preset", "repo-128m", "--kind", "bwd_dkuv",
                         "--tokens", "4096", "--resources")
    assert "registers/thread" in out and "MMA v3" in out, out
    assert "special functions (PTX): " in out and "ex2.approx x" in out, out  # the plain kernels' SiLU


def test_special_function_counts_read_ptx_mnemonics():
    from flashmhf.tuner.resources import special_function_counts

    ptx = ("\tex2.approx.f32 %f3, %f2;\n\tdiv.full.f32 %f5, %f4, %f3;\n\ttanh.approx.f32 %f6, %f1;\n"
           "\ttanh.approx.f32 %f7, %f8;\n\tmul.f32 %f9, %f7, %f6;\n\tex2.approx.ftz.f32 %f10, %f9;\n")
    assert special_function_counts(ptx) == {"div.full": 1, "ex2.approx": 2, "tanh.approx": 2}


def test_resources_refuse_the_interpreter():
    from flashmhf.codegen import Spec, get_kind
    from flashmhf.tuner.resources import kernel_resources

    spec = Spec("bwd_dkuv", 2, 2, 64, 2, 64, "fp32")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernel_resources(spec, get_kind("bwd_dkuv").default(spec, 16))


@pytest.mark.slow
@pytest.mark.parametrize("shape, config", [
    ([16, 16, 128, 22, 256], None), ([16, 16, 128, 22, 256], dict(block_m=64, num_stages=2, coef_fp32=1, halves=1)),
    ([8, 8, 96, 8, 256], None), ([8, 8, 96, 8, 256], dict(block_m=64, num_stages=4, coef_fp32=1, halves=0)),
], ids=["d128-default", "d128-halves", "d96-default", "d96-tuned"])
def test_warp_specialized_dkuv_compiles_for_hopper_without_spills(shape, config):
    # The Gluon kernel cannot run here, but it compiles for sm_90: its partitions must not spill
    # (the grad warp group holds two 64 x 128 fp32 accumulators; at d_h = 96 four, of 64 and 32
    # columns) and its shared memory must fit.
    [kernel] = _report(["bwd_dkuv_ws", *shape, "bf16"], config)
    assert kernel["name"] == "flashmhf_bwd_dkuv_ws"
    assert kernel["mma"] and not kernel["v2"], kernel["mma"]
    assert kernel["spills"] == 0 and kernel["registers"] == 168, kernel  # the kernel-wide budget
    assert 0 < kernel["shared"] <= 232_448
    _assert_fast_sigmoid(kernel)
    if shape[2] == 96:  # dV, dK, dU in accumulators of 64 and 32 columns: nothing padded to 128
        assert any("instr [16, 32, 16]" in m for m in kernel["mma"]), kernel["mma"]
        assert all("[16, 64, 16]" in m or "[16, 32, 16]" in m for m in kernel["mma"]), kernel["mma"]


def _assert_fast_sigmoid(kernel: dict) -> None:
    """The gate's sigmoid is one tanh.approx an element: no exp, no division (6-9 % of these kernels)."""
    assert kernel["special"].get("tanh.approx", 0) > 0, kernel["special"]
    assert set(kernel["special"]) == {"tanh.approx"}, kernel["special"]


_REPO_13B, _REPO_128M = [16, 16, 128, 22, 256], [8, 8, 96, 8, 256]


@pytest.mark.slow
@pytest.mark.parametrize("kind, shape, config", [
    ("fwd_ws", _REPO_13B, None), ("fwd_ws", _REPO_13B, dict(block_f=64, num_stages=4)),  # q held in registers
    ("fwd_ws", _REPO_128M, None), ("fwd_ws", _REPO_128M, dict(block_f=64, num_stages=4)),  # d_h 96: 64 + 32
    ("bwd_dq_ws", _REPO_13B, None), ("bwd_dq_ws", _REPO_13B, dict(num_stages=2, pingpong=0)),
    ("bwd_dq_ws", _REPO_128M, None), ("bwd_dq_ws", _REPO_128M, dict(num_stages=4, pingpong=0)),
    # d_ff split between programs: the partials' store, count and sum fit beside the same loop
    ("fwd_ws_split", _REPO_128M, None), ("fwd_ws_split", _REPO_13B, dict(block_f=64, num_stages=4, split=4)),
])
def test_warp_specialized_forward_and_dq_compile_for_hopper_without_spills(kind, shape, config):
    # Each row group holds a (64, d_h) fp32 accumulator (d_h = 96: two, of 64 and 32 columns) and its
    # tile's products in registers.
    [kernel] = _report([kind, *shape, "bf16"], config)
    assert kernel["name"] == f"flashmhf_{kind}"
    assert kernel["mma"] and not kernel["v2"], kernel["mma"]
    assert kernel["spills"] == 0 and kernel["registers"] == 168, kernel  # the kernel-wide budget
    assert 0 < kernel["shared"] <= 232_448
    _assert_fast_sigmoid(kernel)
    if shape[2] == 96:  # s in accumulators of 64 and 32 columns: no MMA padded to 128 columns of d_h
        assert any("instr [16, 32, 16]" in m for m in kernel["mma"]), kernel["mma"]
        if kind == "bwd_dq_ws" or config:  # 64-wide d_ff tiles: every MMA has N = 64 or 32
            assert all("[16, 64, 16]" in m or "[16, 32, 16]" in m for m in kernel["mma"]), kernel["mma"]


_DEFAULTS_SCRIPT = """
import json, sys
from flashmhf.codegen.arch import ARCHS
from flashmhf.tuner.defaults_check import check_defaults, roles_without_kernel, runtime_specs
out, missing = [], []
for shape, arch, tokens in json.loads(sys.argv[1]):
    arch = ARCHS[arch]
    missing += [(arch.name, role.name) for role, _ in roles_without_kernel(tuple(shape), "bf16", arch, tokens)]
    for r in check_defaults(runtime_specs(tuple(shape), "bf16", arch, tokens), [arch], tokens):
        out.append(dict(arch=arch.name, kind=r.spec.kind, tokens=r.buckets, ok=r.ok, spills=r.spill_bytes,
                        shared=r.shared_bytes, config=r.config))
print(json.dumps([out, missing]))
"""


@pytest.mark.slow
def test_untuned_defaults_compile_without_spills_on_each_architecture():
    # A representative set (benchmarks/check_defaults.py compiles them all), every role the runtime
    # runs: repo-1.3b on an A100 at decode and training sizes, on an L40 (99 KiB of shared memory),
    # and on an H200 at 256 tokens (pointer loads); repo-128m (d_h 96, masked) on an H200 at decode.
    repo_13b, repo_128m = [16, 16, 128, 22, 256], [8, 8, 96, 8, 256]
    cases = [(repo_13b, "sm_80", [1, 16384]), (repo_13b, "sm_89", [16384]), (repo_13b, "sm_90", [256]),
             (repo_128m, "sm_90", [16])]
    out = _run_compiling("-c", _DEFAULTS_SCRIPT, json.dumps(cases))
    reports, missing = json.loads(out.strip().splitlines()[-1])
    assert {(r["arch"], r["kind"]) for r in reports} >= {
        ("sm_80", "fwd"), ("sm_80", "bwd_dq"), ("sm_80", "bwd_dkuv"), ("sm_80", "norm_router"),
        ("sm_80", "router_bwd"), ("sm_89", "bwd_dkuv"), ("sm_89", "router_bwd"), ("sm_90", "fwd"),
        ("sm_90", "norm_router"), ("sm_90", "norm_router_bwd"), ("sm_80", "norm_router_core"),
        ("sm_90", "norm_router_core")}
    assert all(r["ok"] for r in reports), [r for r in reports if not r["ok"]]
    # Before Hopper no norm_router_bwd config of a 128-wide head fits without spills (mma.sync holds
    # its operands whole per warp): the registry runs none there, the layer runs PyTorch instead.
    assert sorted(map(tuple, missing)) == [("sm_80", "norm_router_bwd"), ("sm_89", "norm_router_bwd")]
