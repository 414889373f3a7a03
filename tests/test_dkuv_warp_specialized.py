"""bwd_dkuv_ws: the warp-specialized (Gluon) dK/dU/dV kernel for Hopper GPUs.

On CPU: which shapes and machines it takes, that the op picks it only where it can run, and that
the tuner says so. On a GPU (marker ``gpu``): its gradients against the float64 reference, and the
op's backward through it."""

import pytest
import torch

import flashmhf_runtime
import flashmhf_runtime as fm
from flashmhf.checks import reference_grads_f64, rel_error
from flashmhf.codegen import Spec, SpecError, get_kind, render
from flashmhf.codegen.kinds import bwd_dkuv_ws
from flashmhf_runtime import dispatch, op
from tests.helpers import DH96_GPU_CASES, REPO_13B, REPO_128M, WS_GPU_CASES, core_inputs, pretend_gpu, ws_case_id

KIND = get_kind("bwd_dkuv_ws")


def test_takes_16_bit_power_of_two_head_dims_or_96_and_64_row_tiles():
    assert bwd_dkuv_ws.shape_reason(Spec("bwd_dkuv_ws", *REPO_13B, "bf16")) is None
    assert bwd_dkuv_ws.shape_reason(Spec("bwd_dkuv_ws", 4, 2, 64, 3, 384, "fp16")) is None  # d_e = 384
    assert bwd_dkuv_ws.shape_reason(Spec("bwd_dkuv_ws", *REPO_128M, "bf16")) is None  # d_h = 96: 64 + 32
    assert "16-bit" in bwd_dkuv_ws.shape_reason(Spec("bwd_dkuv_ws", *REPO_13B, "fp32"))
    assert "head_dim=48" in bwd_dkuv_ws.shape_reason(Spec("bwd_dkuv_ws", 4, 4, 48, 3, 128, "bf16"))
    assert "multiple of 64" in bwd_dkuv_ws.shape_reason(Spec("bwd_dkuv_ws", 4, 4, 64, 3, 96, "bf16"))
    with pytest.raises(SpecError, match="head_dim=48"):
        KIND.default(Spec("bwd_dkuv_ws", 4, 4, 48, 3, 128, "bf16"), 1)


def test_head_dim_96_runs_whole_steps_in_column_parts():
    spec = Spec("bwd_dkuv_ws", *REPO_128M, "bf16")
    assert KIND.default(spec, 16384) == {"block_m": 64, "num_stages": 2, "coef_fp32": 0, "halves": 0}
    space = list(KIND.space(spec))
    assert space and all(c["halves"] == 0 for c in space)
    assert "whole steps" in KIND.reject(spec, {"block_m": 64, "num_stages": 2, "coef_fp32": 0, "halves": 1}, None)
    # the same bytes as a 96-wide tile: K/U/V, a 2-slot q/ds ring, two 16-bit coefficient tiles
    config = {"block_m": 64, "num_stages": 2, "coef_fp32": 0, "halves": 0}
    assert bwd_dkuv_ws.estimate_smem(spec, config) == 3 * 64 * 96 * 2 + 2 * 2 * 64 * 96 * 2 + 4 * 64 * 64 * 2 + 1024
    split = render(spec)
    assert "_D_H_PARTS = (64, 32)" in split
    # m and da over K = 96 as two chained MMAs; dK, dU, dV in two accumulators each (N = 64 and 32).
    assert "m = warpgroup_mma(k_smem[1], q_bufs[1].index(s).permute((1, 0)), m, is_async=True)" in split
    assert "da = warpgroup_mma(v_smem[1], ds_bufs[1].index(s).permute((1, 0)), da, is_async=True)" in split
    assert "dv0, dv1 = warpgroup_mma_wait(0, deps=(dv0, dv1))" in split
    assert "dk0, dk1, du0, du1 = warpgroup_mma_wait(0, deps=(dk0, dk1, du0, du1))" in split
    assert "_halves" not in split
    whole = render(Spec("bwd_dkuv_ws", *REPO_13B, "bf16"))
    assert "_D_H_PARTS" not in whole and "_store_part" not in whole and "_gate_partition_halves" in whole


def test_space_respects_shared_memory():
    spec = Spec("bwd_dkuv_ws", *REPO_13B, "bf16")
    space = list(KIND.space(spec))
    assert KIND.default(spec, 16384) == {"block_m": 64, "num_stages": 2, "coef_fp32": 0, "halves": 0}
    assert {"block_m": 64, "num_stages": 4, "coef_fp32": 0, "halves": 1} in space
    # 3 K/U/V tiles (48 KiB) + a 4-slot q/ds ring (128 KiB) + fp32 coefficients (64 KiB) do not fit.
    too_big = {"block_m": 64, "num_stages": 4, "coef_fp32": 1, "halves": 0}
    assert too_big not in space
    assert "shared memory" in KIND.reject(spec, too_big, None)


def test_unavailable_names_what_the_architecture_lacks():
    from flashmhf.codegen.arch import INTERPRETER, SM80, SM90, SM100

    assert "interpreter" in KIND.unavailable(INTERPRETER)
    assert KIND.unavailable(SM90) is None
    assert "Hopper" in KIND.unavailable(SM80) and "sm_80" in KIND.unavailable(SM80)
    assert "Hopper" in KIND.unavailable(SM100)
    assert get_kind("bwd_dkuv").unavailable(INTERPRETER) is None  # the Triton kinds run anywhere
    assert get_kind("bwd_dkuv").unavailable(SM80) is None


def test_op_picks_the_warp_specialized_kind_only_where_it_runs(monkeypatch):
    from flashmhf.codegen.kinds import DKUV

    cuda = torch.device("cuda", 0)
    key = (*REPO_13B, "bf16")
    pretend_gpu(monkeypatch, op, "9.0")
    try:
        assert op.kind_for(DKUV, key, 1, cuda) == "bwd_dkuv_ws"  # at any token count
        assert op.kind_for(DKUV, (4, 4, 48, 3, 128, "bf16"), 4096, cuda) == "bwd_dkuv"  # shape it cannot take
        assert op.kind_for(DKUV, (*REPO_128M, "bf16"), 4096, cuda) == "bwd_dkuv_ws"  # d_h = 96
        assert op.kind_for(DKUV, (*REPO_13B, "fp32"), 4096, cuda) == "bwd_dkuv"
        assert op.kind_for(DKUV, key, 4096, torch.device("cpu")) == "bwd_dkuv"
        monkeypatch.setattr(op, "DISABLED_KINDS", {"bwd_dkuv_ws"})
        assert op.kind_for(DKUV, key, 4096, cuda) == "bwd_dkuv"
        monkeypatch.setattr(op, "DISABLED_KINDS", set())
        pretend_gpu(monkeypatch, op, "8.0")
        assert op.kind_for(DKUV, key, 4096, cuda) == "bwd_dkuv"  # an A100
    finally:
        flashmhf_runtime.reset()


_WHOLE_STEPS = [None, {"block_m": 32, "num_stages": 3, "coef_fp32": 1, "halves": 0}]
_HALVES = [{"block_m": 64, "num_stages": 2, "coef_fp32": 0, "halves": 1},
           {"block_m": 32, "num_stages": 4, "coef_fp32": 1, "halves": 1}]
# Power-of-two heads with every variant; d_h = 96 (column parts) in whole steps, the only ones it takes.
_GPU_RUNS = ([pytest.param(case, config, id=f"{ws_case_id(case)}-{i}") for case in WS_GPU_CASES
              for i, config in enumerate(_WHOLE_STEPS + _HALVES)]
             + [pytest.param(case, config, id=f"{ws_case_id(case)}-{i}") for case in DH96_GPU_CASES
                for i, config in enumerate(_WHOLE_STEPS)])


@pytest.mark.gpu
@pytest.mark.parametrize(("case", "config"), _GPU_RUNS)
def test_kernel_gradients_match_float64_on_gpu(case, config):
    tokens, h, h_kv, d_h, e, d_e, dtype = case
    q, k, u, v, r = core_inputs(tokens, h, h_kv, d_h, e, d_e, dtype, seed=11, device="cuda")
    ds = torch.randn_like(q)
    spec = Spec("bwd_dkuv_ws", h, h_kv, d_h, e, d_e, "bf16" if dtype == torch.bfloat16 else "fp16")
    config = config or KIND.default(spec, tokens)
    outs = [torch.full_like(k, float("nan")) for _ in range(3)]  # poisoned: every element must be written
    dispatch.launch_with_config(tuple(vars(spec).values()), config, q, k, u, v, r, ds, *outs)
    torch.cuda.synchronize()
    want = reference_grads_f64(q, k, u, v, r, ds)[1:4]
    for name, got, ref in zip(("dk", "du", "dv"), outs, want):
        assert torch.isfinite(got).all(), name
        assert rel_error(got, ref) <= 2e-2, (name, rel_error(got, ref))


@pytest.mark.gpu
def test_op_backward_runs_the_warp_specialized_kind_on_hopper():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialized kernel needs a Hopper GPU")
    q, k, u, v, r = core_inputs(513, 4, 2, 64, 3, 64, torch.bfloat16, seed=5, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, u, v, r)]
    ds = torch.randn_like(q)
    got = torch.autograd.grad(fm.flash_mhf(*leaves), leaves, ds)
    spec = Spec("bwd_dkuv_ws", 4, 2, 64, 3, 64, "bf16")
    assert dispatch.chosen_config(spec, 513, torch.cuda.current_device()) is not None  # it really ran
    want = reference_grads_f64(q, k, u, v, r, ds)
    for a, b in zip(got, want):
        assert rel_error(a, b) <= 2e-2
