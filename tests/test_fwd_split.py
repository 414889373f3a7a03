"""fwd_ws_split: fwd_ws's kernel with d_ff split between programs, for 256-4096 tokens on Hopper.

On CPU: its space, defaults and token range; that it renders from fwd_ws's template without changing
fwd_ws; the per-stream scratch the runtime passes it. On a GPU (marker ``gpu``): its output against
the float64 reference, poisoned, at odd token counts, shared kv heads, d_h = 96, d_e = 384, fp16,
every split value, with its counters zeroed after each launch."""

from __future__ import annotations

import types

import pytest
import torch

from flashmhf.checks import reference_f64, rel_error
from flashmhf.codegen import Spec, get_kind, render
from flashmhf.codegen.arch import SM80, SM90
from flashmhf.codegen.kinds import fwd_ws_split
from flashmhf_runtime import dispatch, scratch
from flashmhf_runtime.scratch import ScratchLauncher
from tests.helpers import REPO_13B, REPO_128M, core_inputs, ws_gpu_runs, ws_spec

KIND = get_kind("fwd_ws_split")
REPO_370M = (8, 8, 128, 11, 256)


def test_runs_from_256_to_4096_tokens_where_fwd_ws_runs():
    spec = Spec("fwd_ws_split", *REPO_370M, "bf16")
    config = KIND.default(spec, 1024, SM90)
    assert KIND.reject(spec, config, 1024, SM90) is None and KIND.reject(spec, config, 256, SM90) is None
    assert "runs from 256 tokens" in KIND.reject(spec, config, 255, SM90)
    assert "runs up to 4096 tokens" in KIND.reject(spec, config, 4097, SM90)
    assert "Hopper" in KIND.unavailable(SM80)
    assert KIND.shape_reason(Spec("fwd_ws_split", *REPO_128M, "bf16")) is None  # d_h 96: column parts
    assert "16-bit" in KIND.shape_reason(Spec("fwd_ws_split", *REPO_370M, "fp32"))


def test_default_split_gives_every_sm_a_program():
    # repo-370m at 1024 tokens: 8 row tiles x 8 heads = 64 programs of fwd_ws on 132 SMs.
    spec = Spec("fwd_ws_split", *REPO_370M, "bf16")
    assert fwd_ws_split.programs(spec, 1024) == 64
    assert KIND.default(spec, 1024, SM90)["split"] == 2
    assert KIND.default(spec, 256, SM90)["split"] == 8  # 16 programs
    big = Spec("fwd_ws_split", *REPO_13B, "bf16")
    assert KIND.default(big, 256, SM90)["split"] == 4  # 32 programs: 128 of 132 SMs
    assert KIND.default(spec, 1, SM90)["split"] == 8  # as few as can be: the most shares


def test_a_split_needs_a_tile_per_share():
    spec = Spec("fwd_ws_split", 4, 4, 64, 1, 128, "bf16")  # d_ff 128: two 64-wide tiles, one of 128
    assert KIND.reject(spec, {"block_f": 64, "num_stages": 2, "split": 2}, None) is None
    assert "more shares" in KIND.reject(spec, {"block_f": 64, "num_stages": 2, "split": 3}, None)
    assert KIND.default(spec, 1024, SM90) == {"block_f": 64, "num_stages": 3, "split": 2}
    sizes = {c["split"] for c in KIND.space(Spec("fwd_ws_split", *REPO_370M, "bf16"), 1024, SM90)}
    assert sizes == {2, 3, 4, 8}


def test_renders_from_fwd_ws_template_and_leaves_fwd_ws_unsplit():
    split = render(Spec("fwd_ws_split", *REPO_370M, "bf16"))
    assert "def flashmhf_fwd_ws_split(" in split
    assert "gl.atomic_add(counter, 1, sem=\"acq_rel\", scope=\"gpu\")" in split
    assert "[(_cdiv(n_tokens, 128), _H, split)]" in split and "def scratch(q, *, block_f, num_stages, split)" in split
    parts = render(Spec("fwd_ws_split", *REPO_128M, "bf16"))
    assert "_store_partial(ws_ptr, acc1, row0, h, n_tokens, 64)" in parts  # the 32-wide part after 64
    whole = render(Spec("fwd_ws", *REPO_370M, "bf16"))
    assert "ws_ptr" not in whole and "_tile_range" not in whole and "def flashmhf_fwd_ws(" in whole


class _Module:
    """A rendered module's scratch interface, for a launch on CPU tensors."""

    @staticmethod
    def scratch(q, *, block_f, num_stages, split):
        return split * q.numel(), 3


def test_scratch_launcher_passes_the_streams_memory_and_fresh_memory_under_capture(monkeypatch):
    monkeypatch.setattr(scratch, "_workspace", {})
    monkeypatch.setattr(scratch, "_counters", {})
    calls = []
    config = {"block_f": 64, "num_stages": 2, "split": 2}
    launcher = ScratchLauncher(lambda *args: calls.append(args), _Module.scratch, config)
    q = torch.randn(5, 2, 4)
    launcher(q, "k")
    launcher(q, "k")
    (q0, k0, ws0, c0), (_, _, ws1, c1) = calls
    assert q0 is q and k0 == "k" and ws0 is ws1 and c0 is c1
    assert ws0.dtype == torch.float32 and ws0.numel() >= 2 * q.numel()
    assert c0.dtype == torch.int32 and c0.numel() >= 3 and not c0.any()
    launcher(torch.randn(50, 2, 4), "k")  # more tokens: the buffer grows
    assert calls[-1][2].numel() >= 2 * 400 and calls[-1][2] is not ws0
    monkeypatch.setattr(scratch, "capturing", lambda: True)
    launcher(q, "k")
    launcher(q, "k")
    assert calls[-1][2] is not calls[-2][2] and calls[-1][3] is not calls[-2][3]


def test_dispatch_binds_modules_with_scratch_through_it(monkeypatch):
    module = types.SimpleNamespace(launch=lambda *a, **k: None, scratch=_Module.scratch)
    monkeypatch.setattr(dispatch, "runtime_load", lambda spec: module)
    bound = dispatch.bind(Spec("fwd_ws_split", *REPO_370M, "bf16"), {"block_f": 64, "num_stages": 2, "split": 2})
    assert isinstance(bound, ScratchLauncher) and bound.config["split"] == 2
    del module.scratch
    assert not isinstance(dispatch.bind(Spec("fwd_ws", *REPO_370M, "bf16"), {"block_f": 64, "num_stages": 2}),
                          ScratchLauncher)


# ------------------------------------------------------------------------------------------------ GPU

_GPU_RUNS = ws_gpu_runs("fwd_ws_split", ({"block_f": 64, "num_stages": 3, "split": 2},
                                         {"block_f": 128, "num_stages": 2, "split": 3},
                                         {"block_f": 64, "num_stages": 2, "split": 8}))


@pytest.mark.gpu
@pytest.mark.parametrize("case, config", _GPU_RUNS)
def test_kernel_matches_float64_and_leaves_its_counters_zeroed_on_gpu(case, config):
    tokens, h, h_kv, d_h, e, d_e, dtype = case
    spec = ws_spec("fwd_ws_split", case)
    q, k, u, v, r = core_inputs(tokens, h, h_kv, d_h, e, d_e, dtype, seed=11, device="cuda")
    want = reference_f64(q, k, u, v, r)
    module = dispatch.runtime_load(spec)
    n_ws, n_counters = module.scratch(q, **config)
    ws = torch.full((n_ws,), float("nan"), device="cuda")
    counters = torch.zeros(n_counters + 1, dtype=torch.int32, device="cuda")
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
    outs = []
    for _ in range(2):  # the second launch runs on the counters the first left
        out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
        module.launch(q, k, u, v, r, out, ws, counters, **config)
        torch.cuda.synchronize()
        assert not counters.any(), counters.nonzero()
        assert torch.isfinite(out).all() and rel_error(out, want) <= tol
        outs.append(out)
    assert torch.equal(outs[0], outs[1])  # the same sums in the same order: deterministic


@pytest.mark.gpu
def test_op_runs_it_on_hopper_with_the_streams_scratch(monkeypatch):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialized kernel needs a Hopper GPU")
    import flashmhf_runtime as fm
    from flashmhf_runtime import op

    q, k, u, v, r = core_inputs(700, 8, 8, 128, 11, 256, torch.bfloat16, seed=5, device="cuda")
    want = reference_f64(q, k, u, v, r)
    monkeypatch.setattr(op, "DISABLED_KINDS", {"fwd"})  # between 256 and 1023 tokens only fwd_ws_split is left
    fm.reset()
    try:
        for _ in range(3):  # the first call chooses, the next take the fast path (replayed)
            assert rel_error(fm.flash_mhf(q, k, u, v, r), want) <= 1e-2
        spec = Spec("fwd_ws_split", 8, 8, 128, 11, 256, "bf16")
        assert dispatch.chosen_config(spec, 700, torch.cuda.current_device()) is not None  # it really ran
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fm.flash_mhf(q, k, u, v, r)
        graph.replay()
        eager = fm.flash_mhf(q, k, u, v, r)
        torch.cuda.synchronize()
        assert rel_error(captured, want) <= 1e-2 and torch.equal(captured, eager)
    finally:
        fm.reset()
