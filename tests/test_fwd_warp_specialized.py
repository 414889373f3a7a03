"""fwd_ws: the warp-specialized (Gluon) forward kernel for Hopper GPUs at large token counts.

On CPU: which shapes and configs it takes and that it renders. On a GPU (marker ``gpu``): its
output against the float64 reference at odd token counts, shared kv heads, small head dims, d_h = 96
(column parts of 64 + 32) and fp16, for every kind of config."""

import pytest
import torch
from click.testing import CliRunner

import flashmhf_runtime
from flashmhf.checks import reference_f64, rel_error
from flashmhf.cli.app import main as cli
from flashmhf.codegen import Spec, SpecError, get_kind, render
from flashmhf.codegen.kinds import fwd_ws
from flashmhf_runtime import dispatch
from tests.helpers import REPO_13B, REPO_128M, core_inputs, pretend_gpu, ws_gpu_runs, ws_spec

KIND = get_kind("fwd_ws")


def test_takes_16_bit_power_of_two_head_dims_or_96_and_64_wide_tiles():
    assert fwd_ws.shape_reason(Spec("fwd_ws", *REPO_13B, "bf16")) is None
    assert fwd_ws.shape_reason(Spec("fwd_ws", 4, 2, 64, 3, 384, "fp16")) is None  # d_e = 384
    assert fwd_ws.shape_reason(Spec("fwd_ws", *REPO_128M, "bf16")) is None  # d_h = 96: 64 + 32
    assert "16-bit" in fwd_ws.shape_reason(Spec("fwd_ws", *REPO_13B, "fp32"))
    assert "head_dim=48" in fwd_ws.shape_reason(Spec("fwd_ws", 4, 4, 48, 3, 128, "bf16"))
    assert "multiple of 64" in fwd_ws.shape_reason(Spec("fwd_ws", 4, 4, 64, 3, 96, "bf16"))
    with pytest.raises(SpecError, match="head_dim=48"):
        KIND.default(Spec("fwd_ws", 4, 4, 48, 3, 128, "bf16"), 4096)


def test_space_respects_shared_memory_and_token_counts():
    spec = Spec("fwd_ws", *REPO_13B, "bf16")
    space = list(KIND.space(spec))
    assert KIND.default(spec, 16384) == {"block_f": 128, "num_stages": 2}
    assert {"block_f": 64, "num_stages": 4} in space
    # 3 slots of 128-wide K/U/V tiles (288 KiB) do not fit.
    assert "shared memory" in KIND.reject(spec, {"block_f": 128, "num_stages": 3}, None)
    assert "fwd" in KIND.reject(spec, {"block_f": 64, "num_stages": 3}, 512)
    # d_e = 64 cannot take 128-wide tiles: the default falls back to 64-wide ones.
    small = Spec("fwd_ws", 4, 4, 64, 3, 64, "bf16")
    assert "expert_dim" in KIND.reject(small, {"block_f": 128, "num_stages": 2}, None)
    assert KIND.default(small, 4096) == {"block_f": 64, "num_stages": 3}


def test_head_dim_96_space_and_shared_memory():
    # q tiles and ring slots as wide as the head (64 + 32 columns): 128-wide tiles fit 2 slots.
    spec = Spec("fwd_ws", *REPO_128M, "bf16")
    assert KIND.default(spec, 16384) == {"block_f": 128, "num_stages": 2}
    q_tiles, ring = 2 * 64 * 96 * 2, 2 * 3 * 128 * 96 * 2
    assert fwd_ws.estimate_smem(spec, {"block_f": 128, "num_stages": 2}) == q_tiles + ring + 1024
    assert list(KIND.space(spec)) == [{"block_f": 64, "num_stages": s} for s in (2, 3, 4)] + [
        {"block_f": 128, "num_stages": 2}]
    assert "shared memory" in KIND.reject(spec, {"block_f": 128, "num_stages": 3}, None)


def test_head_dim_96_renders_in_column_parts_and_powers_of_two_in_one():
    split = render(Spec("fwd_ws", *REPO_128M, "bf16"))
    assert "_D_H_PARTS = (64, 32)" in split
    # m over K = 96 as two chained MMAs; s in two accumulators (N = 64 and 32).
    assert "m = warpgroup_mma(q1, k_bufs[1].index(s).permute((1, 0)), m, is_async=True)" in split
    assert "acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))" in split
    whole = render(Spec("fwd_ws", *REPO_13B, "bf16"))
    assert "_D_H_PARTS" not in whole and "acc = warpgroup_mma(a, v_bufs.index(s), acc, is_async=True)" in whole


def test_shares_the_hopper_requirements_of_the_backward_kind():
    from flashmhf.codegen.arch import INTERPRETER, SM89, SM90

    assert KIND.needs == get_kind("bwd_dkuv_ws").needs
    assert KIND.unavailable(SM90) is None
    assert "Hopper" in KIND.unavailable(SM89) and "sm_89" in KIND.unavailable(SM89)
    assert "interpreter" in KIND.unavailable(INTERPRETER)


def test_show_renders_the_gluon_source():
    result = CliRunner().invoke(cli, ["show", "--preset", "repo-1.3b", "--kind", "fwd_ws"])
    assert result.exit_code == 0, result.output
    assert "@gluon.jit" in result.output and "gl.warp_specialize" in result.output


# ------------------------------------------------------------------------------------------------ GPU

_GPU_RUNS = ws_gpu_runs("fwd_ws", ({"block_f": 64, "num_stages": 3}, {"block_f": 64, "num_stages": 2},
                                   {"block_f": 128, "num_stages": 2}))


@pytest.mark.gpu
@pytest.mark.parametrize("case, config", _GPU_RUNS)
def test_kernel_matches_float64_on_gpu(case, config):
    tokens, h, h_kv, d_h, e, d_e, dtype = case
    spec = ws_spec("fwd_ws", case)
    q, k, u, v, r = core_inputs(tokens, h, h_kv, d_h, e, d_e, dtype, seed=7, device="cuda")
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    dispatch.launch_with_config(tuple(vars(spec).values()), config, q, k, u, v, r, out)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
    assert rel_error(out, reference_f64(q, k, u, v, r)) <= tol


def test_op_runs_it_from_1024_tokens_on_hopper_only(monkeypatch):
    from flashmhf.codegen.kinds import FORWARD
    from flashmhf_runtime import op

    cuda = torch.device("cuda", 0)
    key = (*REPO_13B, "bf16")
    pretend_gpu(monkeypatch, op, "9.0")
    try:
        assert op.kind_for(FORWARD, key, 1024, cuda) == "fwd_ws"
        assert op.kind_for(FORWARD, key, 1023, cuda) == "fwd_ws_split"  # d_ff split over more programs
        assert op.kind_for(FORWARD, key, 255, cuda) == "fwd"  # decode and short prefill stay on fwd
        assert op.kind_for(FORWARD, (4, 4, 48, 3, 128, "bf16"), 4096, cuda) == "fwd"  # shape it cannot take
        assert op.kind_for(FORWARD, (*REPO_128M, "bf16"), 4096, cuda) == "fwd_ws"  # d_h = 96
        assert op.kind_for(FORWARD, (*REPO_128M, "bf16"), 255, cuda) == "fwd"
        assert op.kind_for(FORWARD, (*REPO_13B, "fp32"), 4096, cuda) == "fwd"
        assert op.kind_for(FORWARD, key, 4096, torch.device("cpu")) == "fwd"
        assert op.kernel_kinds(key, 4096, cuda) == {"forward": "fwd_ws", "dq": "bwd_dq_ws", "dkuv": "bwd_dkuv_ws"}
        assert op.kernel_kinds(key, 64, cuda) == {"forward": "fwd", "dq": "bwd_dq", "dkuv": "bwd_dkuv_ws"}
        monkeypatch.setattr(op, "DISABLED_KINDS", {"fwd_ws", "fwd_ws_split"})
        assert op.kind_for(FORWARD, key, 4096, cuda) == "fwd"
        monkeypatch.setattr(op, "DISABLED_KINDS", set())
        pretend_gpu(monkeypatch, op, "8.0")
        assert op.kind_for(FORWARD, key, 4096, cuda) == "fwd"  # an A100
    finally:
        flashmhf_runtime.reset()


def test_kinds_say_which_shapes_they_cannot_take():
    from flashmhf.codegen import get_kind

    assert get_kind("fwd_ws").shape_reason(Spec("fwd_ws", *REPO_13B, "bf16")) is None
    assert "16-bit" in get_kind("fwd_ws").shape_reason(Spec("fwd_ws", *REPO_13B, "fp32"))
    assert "head_dim=48" in get_kind("bwd_dkuv_ws").shape_reason(Spec("bwd_dkuv_ws", 4, 4, 48, 3, 128, "bf16"))
    assert get_kind("fwd").shape_reason(Spec("fwd", 4, 4, 96, 3, 128, "fp32")) is None  # fwd takes every shape


def test_tune_leaves_small_token_counts_to_fwd():
    from flashmhf.codegen.arch import SM90
    from flashmhf.tuner.session import tunable_jobs

    spec = Spec("fwd_ws", *REPO_13B, "bf16")
    assert tunable_jobs([spec], (1, 256, 1024, 16384), SM90) == [(spec, 1024), (spec, 16384)]


@pytest.mark.gpu
def test_op_forward_runs_the_warp_specialized_kind_on_hopper():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialized kernel needs a Hopper GPU")
    q, k, u, v, r = core_inputs(1500, 4, 2, 64, 3, 128, torch.bfloat16, seed=5, device="cuda")
    want = reference_f64(q, k, u, v, r)
    import flashmhf_runtime as fm

    for _ in range(2):  # the first call chooses and remembers, the second takes the fast path
        assert rel_error(fm.flash_mhf(q, k, u, v, r), want) <= 1e-2
    spec = Spec("fwd_ws", 4, 2, 64, 3, 128, "bf16")
    assert dispatch.chosen_config(spec, 1500, torch.cuda.current_device()) is not None  # it really ran
    leaves = [t.clone().requires_grad_() for t in (q, k, u, v, r)]
    assert rel_error(fm.flash_mhf(*leaves), want) <= 1e-2  # the autograd path
