"""bwd_dq_ws: the warp-specialized (Gluon) dq/dr kernel for Hopper GPUs at large token counts.

On CPU: its space and the op's choice. On a GPU (marker ``gpu``): dq and dr against the float64
reference at odd token counts, shared kv heads, small head dims, d_h = 96 (column parts of 64 + 32),
d_e = 384 and fp16."""

import pytest
import torch

import flashmhf_runtime
from flashmhf.checks import reference_grads_f64, rel_error
from flashmhf.codegen import Spec, SpecError, get_kind
from flashmhf.codegen.kinds import bwd_dq_ws
from flashmhf_runtime import dispatch, op
from tests.helpers import DH96_GPU_CASES, REPO_13B, REPO_128M, WS_GPU_CASES, core_inputs, pretend_gpu, ws_case_id

KIND = get_kind("bwd_dq_ws")


def test_space_and_default():
    spec = Spec("bwd_dq_ws", *REPO_13B, "bf16")
    assert KIND.default(spec, 16384) == {"num_stages": 3, "pingpong": 1}
    # 4 slots of K/U/V tiles (192 KiB) + q, ds (64 KiB) do not fit.
    assert [(c["num_stages"], c["pingpong"]) for c in KIND.space(spec)] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert "shared memory" in KIND.reject(spec, {"num_stages": 4, "pingpong": 0}, None)
    assert "bwd_dq" in KIND.reject(spec, {"num_stages": 3, "pingpong": 1}, 1000)
    assert KIND.reject(Spec("bwd_dq_ws", 4, 2, 64, 3, 384, "fp16"), {"num_stages": 4, "pingpong": 1}, None) is None
    with pytest.raises(SpecError, match="head_dim=48"):
        KIND.default(Spec("bwd_dq_ws", 4, 4, 48, 3, 128, "bf16"), 4096)


def test_head_dim_96_space():
    # q, ds and the ring as wide as the head (64 + 32 columns): 4 slots fit.
    spec = Spec("bwd_dq_ws", *REPO_128M, "bf16")
    assert KIND.default(spec, 16384) == {"num_stages": 3, "pingpong": 1}
    assert len(list(KIND.space(spec))) == 6
    q_ds_tiles, ring = 4 * 64 * 96 * 2, 4 * 3 * 64 * 96 * 2
    assert bwd_dq_ws.estimate_smem(spec, {"num_stages": 4, "pingpong": 1}) == q_ds_tiles + ring + 1024


def test_op_picks_it_from_1024_tokens_on_hopper_only(monkeypatch):
    from flashmhf.codegen.kinds import DQ

    cuda = torch.device("cuda", 0)
    key = (*REPO_13B, "bf16")
    pretend_gpu(monkeypatch, op, "9.0")
    try:
        assert op.kind_for(DQ, key, 4096, cuda) == "bwd_dq_ws"
        assert op.kind_for(DQ, key, 77, cuda) == "bwd_dq"
        assert op.kind_for(DQ, (*REPO_13B, "fp32"), 4096, cuda) == "bwd_dq"
        assert op.kind_for(DQ, (*REPO_128M, "bf16"), 4096, cuda) == "bwd_dq_ws"  # d_h = 96
        assert op.kind_for(DQ, (4, 4, 48, 3, 128, "bf16"), 4096, cuda) == "bwd_dq"
        monkeypatch.setattr(op, "DISABLED_KINDS", {"bwd_dq_ws"})
        assert op.kind_for(DQ, key, 4096, cuda) == "bwd_dq"
    finally:
        flashmhf_runtime.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("case", WS_GPU_CASES + DH96_GPU_CASES, ids=ws_case_id)
@pytest.mark.parametrize("config", [{"num_stages": 2, "pingpong": 0}, {"num_stages": 3, "pingpong": 1},
                                    {"num_stages": 2, "pingpong": 1}])
@pytest.mark.parametrize("r_dtype", [torch.float32, torch.bfloat16])
def test_kernel_gradients_match_float64_on_gpu(case, config, r_dtype):
    tokens, h, h_kv, d_h, e, d_e, dtype = case
    q, k, u, v, r = core_inputs(tokens, h, h_kv, d_h, e, d_e, dtype, seed=13, device="cuda", r_dtype=r_dtype)
    ds = torch.randn_like(q)
    spec = Spec("bwd_dq_ws", h, h_kv, d_h, e, d_e, "bf16" if dtype == torch.bfloat16 else "fp16")
    dq, dr = torch.full_like(q, float("nan")), torch.full_like(r, float("nan"))  # poisoned
    dispatch.launch_with_config(tuple(vars(spec).values()), config, q, k, u, v, r, ds, dq, dr)
    torch.cuda.synchronize()
    want = reference_grads_f64(q, k, u, v, r, ds)
    for name, got, ref in (("dq", dq, want[0]), ("dr", dr, want[4])):
        assert torch.isfinite(got).all(), name
        assert rel_error(got, ref) <= 2e-2, (name, rel_error(got, ref))
