"""Backward of the core: the bwd_dq / bwd_dkuv kernels under the interpreter, the autograd
registration of flashmhf::core, opcheck, torch.compile, and the codegen of the backward kinds."""

from __future__ import annotations

import zlib

import pytest
import torch
from click.testing import CliRunner

import flashmhf_runtime as fm
from flashmhf.cli import main as cli_main
from flashmhf.codegen import KINDS, Spec, SpecError, get_kind, load, render
from flashmhf_runtime import op, reference
from tests.helpers import POISON, core_inputs, misaligned, rel_error

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 2e-2}
GRADS = ("dq", "dk", "du", "dv", "dr")

# (tokens, H, H_kv, d_h, E, d_e): T = 1, T not a multiple of any tile, d_h 96 (padded), d_e 384, H_kv < H.
SHAPES = [
    (1, 2, 2, 128, 2, 64),
    (37, 4, 2, 96, 3, 64),
    (19, 2, 1, 64, 2, 384),
    (23, 3, 3, 96, 2, 128),
    (5, 4, 1, 32, 3, 32),
]
# One config of each kind per case; the pairs cover 1 and several tiles per sub-network, row tiles
# smaller and larger than T, warps and stages, and every bwd_dkuv structure (one kernel or dV split
# off; rows or weights on the M side).
CONFIG_PAIRS = [
    (dict(block_m=16, block_f=16, num_warps=4, num_stages=1),
     dict(block_f=32, block_m=16, num_warps=4, num_stages=1, split_dv=0, rows_major=0)),
    (dict(block_m=32, block_f=32, num_warps=4, num_stages=2),
     dict(block_f=16, block_m=32, num_warps=4, num_stages=2, split_dv=1, rows_major=1)),
    (dict(block_m=64, block_f=64, num_warps=8, num_stages=2),
     dict(block_f=64, block_m=16, num_warps=8, num_stages=2, split_dv=1, rows_major=0)),
]


def _spec(kind: str, shape, dtype_name: str) -> Spec:
    return Spec(kind, *shape[1:], dtype_name)


def _valid(shape, pair, dtype_name="fp32") -> bool:
    return all(
        get_kind(kind).reject(_spec(kind, shape, dtype_name), cfg, None) is None
        for kind, cfg in zip(("bwd_dq", "bwd_dkuv"), pair)
    )


def reference_grads(q, k, u, v, r, ds) -> tuple[torch.Tensor, ...]:
    """Autograd of the float64 reference: (dq, dk, du, dv, dr)."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, u, v, r)]
    s = reference.flash_mhf(*leaves)
    return torch.autograd.grad(s, leaves, ds.double().cpu())


def run_kernels(shape, dtype_name, pair, seed, r_dtype=torch.float32):
    """Launch both kernel modules directly on NaN-poisoned outputs; return their five gradients."""
    tokens, h, _, d_h, _, _ = shape
    dtype = DTYPES[dtype_name]
    q, k, u, v, r = core_inputs(*shape, dtype, seed=seed, r_dtype=r_dtype)
    ds = torch.randn(tokens, h, d_h, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    dq, dr = torch.full_like(q, POISON), torch.full_like(r, POISON)
    dk, du, dv = (torch.full_like(k, POISON) for _ in range(3))
    load(_spec("bwd_dq", shape, dtype_name)).launch(q, k, u, v, r, ds, dq, dr, **pair[0])
    load(_spec("bwd_dkuv", shape, dtype_name)).launch(q, k, u, v, r, ds, dk, du, dv, **pair[1])
    return (dq, dk, du, dv, dr), reference_grads(q, k, u, v, r, ds)


def test_kernels_take_weights_that_start_off_a_16_byte_boundary():
    """K/U/V reach both kernels through TMA descriptors, whose bases must be 16-byte aligned: a
    misaligned (contiguous) view still gives the right gradients."""
    shape = (21, 4, 2, 64, 2, 32)
    tokens, h, _, d_h, _, _ = shape
    q, k, u, v, r = core_inputs(*shape, torch.float32, seed=12)
    k_off, u_off, v_off = (misaligned(w) for w in (k, u, v))
    ds = torch.randn(tokens, h, d_h, generator=torch.Generator().manual_seed(13))
    dq, dr = torch.full_like(q, POISON), torch.full_like(r, POISON)
    dk, du, dv = (torch.full_like(k, POISON) for _ in range(3))
    dq_cfg, dkuv_cfg = CONFIG_PAIRS[0]
    load(_spec("bwd_dq", shape, "fp32")).launch(q, k_off, u_off, v_off, r, ds, dq, dr, **dq_cfg)
    load(_spec("bwd_dkuv", shape, "fp32")).launch(q, k_off, u_off, v_off, r, ds, dk, du, dv, **dkuv_cfg)
    errors = _errors((dq, dk, du, dv, dr), reference_grads(q, k, u, v, r, ds))
    assert max(errors.values()) <= 1e-3, errors


def _errors(out, ref) -> dict[str, float]:
    return {name: rel_error(o, g) for name, o, g in zip(GRADS, out, ref)}


def _shape_id(s) -> str:
    return "T{}_H{}-{}_dh{}_E{}x{}".format(*s)


def _pair_id(p) -> str:
    a, b = p
    return f"dq{a['block_m']}x{a['block_f']}-dkuv{b['block_f']}x{b['block_m']}"


# ---------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize(
    "shape,pair",
    [pytest.param(s, p, id=f"{_shape_id(s)}-{_pair_id(p)}") for s in SHAPES for p in CONFIG_PAIRS if _valid(s, p)],
)
def test_kernels_fp32(shape, pair):
    out, ref = run_kernels(shape, "fp32", pair, seed=zlib.crc32(repr((shape, pair)).encode()))
    errors = _errors(out, ref)
    assert max(errors.values()) <= TOL["fp32"], errors


def test_every_shape_has_two_config_pairs():
    for shape in SHAPES:
        assert sum(_valid(shape, p) for p in CONFIG_PAIRS) >= 2, shape


@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
def test_kernels_half(dtype_name):
    shape = SHAPES[1]  # d_h 96 padded, H_kv < H, odd T
    for pair in CONFIG_PAIRS[:2]:
        out, ref = run_kernels(shape, dtype_name, pair, seed=11)
        assert all(o.dtype == DTYPES[dtype_name] for o in out[:4]) and out[4].dtype == torch.float32
        errors = _errors(out, ref)
        assert max(errors.values()) <= TOL[dtype_name], (pair, errors)


def test_kernels_r_in_q_dtype_gives_dr_in_that_dtype():
    out, ref = run_kernels(SHAPES[2], "fp16", CONFIG_PAIRS[0], seed=5, r_dtype=torch.float16)
    assert out[4].dtype == torch.float16
    errors = _errors(out, ref)
    assert max(errors.values()) <= TOL["fp16"], errors


FUSED_CONFIGS = [
    dict(block_f=16, block_m=16, num_warps=4, num_stages=1),
    dict(block_f=32, block_m=32, num_warps=8, num_stages=2),
]


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_fused_kernel(shape):
    """bwd_fused (one pass, dq/dr by atomics): all five gradients, fp32 for every shape, then 16-bit."""
    for dtype_name, config in (("fp32", FUSED_CONFIGS[0]), ("fp32", FUSED_CONFIGS[1]), ("bf16", FUSED_CONFIGS[1])):
        if dtype_name == "bf16" and shape != SHAPES[1]:
            continue
        spec = _spec("bwd_fused", shape, dtype_name)
        if get_kind("bwd_fused").reject(spec, config, None):
            continue
        dtype = DTYPES[dtype_name]
        q, k, u, v, r = core_inputs(*shape, dtype, seed=21, r_dtype=dtype)  # dr through the fp32 workspace
        ds = torch.randn(q.shape, generator=torch.Generator().manual_seed(22)).to(dtype)
        dq, dr = torch.full_like(q, POISON), torch.full_like(r, POISON)
        dk, du, dv = (torch.full_like(k, POISON) for _ in range(3))
        load(spec).launch(q, k, u, v, r, ds, dq, dk, du, dv, dr, **config)
        errors = _errors((dq, dk, du, dv, dr), reference_grads(q, k, u, v, r, ds))
        assert max(errors.values()) <= TOL[dtype_name], (dtype_name, config, errors)


def test_kernels_write_nothing_outside_their_outputs():
    """Outputs are views into larger NaN buffers whose guard regions must stay NaN."""
    shape, pair = SHAPES[3], CONFIG_PAIRS[1]
    tokens, h, h_kv, d_h, e, d_e = shape
    q, k, u, v, r = core_inputs(*shape, torch.float32, seed=3)
    ds = torch.randn_like(q)
    guard = 64

    def boxed(like):
        buf = torch.full((like.numel() + 2 * guard,), POISON)
        return buf, buf[guard : guard + like.numel()].view(like.shape)

    (bq, dq), (br, dr), (bk, dk), (bu, du), (bv, dv) = (boxed(t) for t in (q, r, k, u, v))
    load(_spec("bwd_dq", shape, "fp32")).launch(q, k, u, v, r, ds, dq, dr, **pair[0])
    load(_spec("bwd_dkuv", shape, "fp32")).launch(q, k, u, v, r, ds, dk, du, dv, **pair[1])
    for name, buf, out in zip(GRADS, (bq, bk, bu, bv, br), (dq, dk, du, dv, dr)):
        assert torch.isnan(buf[:guard]).all() and torch.isnan(buf[-guard:]).all(), f"{name} wrote out of bounds"
        assert torch.isfinite(out).all(), f"{name} left elements unwritten"


# ---------------------------------------------------------------------------------- autograd


def _leaves(shape_or_inputs, dtype=torch.float32, seed=0, **kw):
    inputs = core_inputs(*shape_or_inputs, dtype, seed=seed, **kw)
    return [t.requires_grad_() for t in inputs]


def test_op_backward_leading_dims_matches_reference():
    q, k, u, v, r = _leaves((0, 4, 2, 96, 3, 64), lead=(2, 7), seed=2)
    s = fm.flash_mhf(q, k, u, v, r)
    ds = torch.randn_like(s)
    s.backward(ds)
    ref = reference_grads(q, k, u, v, r, ds)
    errors = _errors([t.grad for t in (q, k, u, v, r)], ref)
    assert max(errors.values()) <= TOL["fp32"], errors
    assert q.grad.shape == q.shape and r.grad.shape == r.shape and k.grad.shape == k.shape


def test_op_backward_strided_q_and_expanded_grad_and_fp16_r():
    """q viewed from a wider buffer, ds from .sum() (stride 0 everywhere), r in q's dtype (fp16)."""
    q, k, u, v, r = core_inputs(11, 2, 2, 64, 2, 32, torch.float16, seed=4, r_dtype=torch.float16)
    wide = torch.randn(11, 3, 2, 64, dtype=torch.float16)
    wide[:, 1] = q
    wide.requires_grad_()
    k, u, v, r = (t.requires_grad_() for t in (k, u, v, r))
    q_view = wide[:, 1]
    assert not q_view.is_contiguous()
    fm.flash_mhf(q_view, k, u, v, r).sum().backward()
    assert r.grad.dtype == torch.float16 and wide.grad.dtype == torch.float16
    ref = reference_grads(q, k, u, v, r, torch.ones(q.shape, dtype=torch.float64))
    errors = _errors([wide.grad[:, 1], k.grad, u.grad, v.grad, r.grad], ref)
    assert max(errors.values()) <= TOL["fp16"], errors
    assert (wide.grad[:, 0] == 0).all() and (wide.grad[:, 2] == 0).all()


def test_rows_for_descriptors_copy_views_tma_cannot_read():
    """The generated host helper that readies q/ds for TMA descriptors: real rows of H * d_h values,
    16-byte aligned. An expanded gradient (row stride 0) and a misaligned view are copied; a
    strided view with usable rows is not."""
    mod = load(Spec("bwd_dkuv", 2, 2, 64, 2, 32, "fp32"))
    expanded = torch.ones(1, 2, 64).expand(7, 2, 64)
    rows = mod._rows(expanded)
    assert rows.stride(0) == 2 * 64 and torch.equal(rows, expanded)
    wide = torch.randn(7, 3, 2, 64)[:, 1]  # rows of a wider buffer: readable as they are
    assert mod._rows(wide) is wide
    off = misaligned(torch.randn(7, 2, 64))
    assert mod._rows(off).data_ptr() % 16 == 0 and torch.equal(mod._rows(off), off)


@pytest.mark.parametrize(
    "needs,kinds",
    [
        ("q", {"bwd_dq"}),
        ("r", {"bwd_dq"}),
        ("k", {"bwd_dkuv"}),
        ("uv", {"bwd_dkuv"}),
        ("qkuvr", {"bwd_dq", "bwd_dkuv"}),
    ],
)
def test_op_backward_launches_only_needed_kernels(monkeypatch, needs, kinds):
    launched = []
    real_launch = op.dispatch.launch

    def recording_launch(spec_key, *args):
        launched.append(spec_key[0])
        return real_launch(spec_key, *args)

    monkeypatch.setattr(op.dispatch, "launch", recording_launch)
    inputs = dict(zip("qkuvr", core_inputs(6, 2, 1, 32, 2, 16, torch.float32, seed=8)))
    for name in needs:
        inputs[name].requires_grad_()
    s = fm.flash_mhf(*inputs.values())
    grads = torch.autograd.grad(s.sum(), [inputs[n] for n in needs])
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert set(launched) - {"fwd"} == kinds


def test_only_inputs_are_saved_for_backward():
    """No T x d_ff intermediate (nor s) is kept between forward and backward."""
    inputs = _leaves((9, 2, 2, 32, 2, 16), seed=6)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s = fm.flash_mhf(*inputs)
    assert len(saved) == 5
    assert all(any(a is b for b in inputs) for a in saved)
    s.sum().backward()


def test_zero_tokens_backward():
    q, k, u, v, r = _leaves((0, 2, 2, 32, 2, 16), seed=7)
    fm.flash_mhf(q, k, u, v, r).sum().backward()
    assert q.grad.shape == (0, 2, 32) and r.grad.shape == (0, 2, 2)
    assert (k.grad == 0).all() and (v.grad == 0).all()


def test_reference_backward_without_interpreter(monkeypatch):
    """On CPU without TRITON_INTERPRET the op's backward is the written-out reference (in fp32)."""
    monkeypatch.setattr(op, "_INTERPRET", False)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, u, v, r = _leaves((13, 4, 2, 48, 3, 32), dtype=dtype, seed=9)
        s = fm.flash_mhf(q, k, u, v, r)
        ds = torch.randn_like(s)
        s.backward(ds)
        errors = _errors([t.grad for t in (q, k, u, v, r)], reference_grads(q, k, u, v, r, ds))
        assert max(errors.values()) <= tol, (dtype, errors)


def test_written_out_reference_backward_equals_autograd_float64():
    q, k, u, v, r = core_inputs(7, 4, 2, 16, 3, 8, torch.float64, seed=10, r_dtype=torch.float64)
    ds = torch.randn_like(q)
    ours = reference.flash_mhf_backward(q, k, u, v, r, ds)
    for name, a, b in zip(GRADS, ours, reference_grads(q, k, u, v, r, ds)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), name


class _ReferenceCore(torch.autograd.Function):
    """The CPU reference path: reference forward, written-out reference backward."""

    @staticmethod
    def forward(ctx, q, k, u, v, r):
        ctx.save_for_backward(q, k, u, v, r)
        return reference.flash_mhf(q, k, u, v, r)

    @staticmethod
    def backward(ctx, ds):
        return reference.flash_mhf_backward(*ctx.saved_tensors, ds)


def test_gradcheck_reference_backward_float64():
    inputs = [t.requires_grad_() for t in core_inputs(3, 2, 1, 8, 2, 4, torch.float64, seed=12, r_dtype=torch.float64)]
    assert torch.autograd.gradcheck(_ReferenceCore.apply, inputs)


def test_opcheck_core_and_core_bwd():
    q, k, u, v, r = core_inputs(5, 4, 2, 32, 3, 16, torch.float32, seed=13)
    ds = torch.randn_like(q)
    torch.library.opcheck(op.core_op, [t.requires_grad_() for t in (q, k, u, v, r)] + [""])
    detached = [t.detach() for t in (q, k, u, v, r)]
    torch.library.opcheck(op.core_bwd_op, (*detached, ds, True, True))
    torch.library.opcheck(op.core_bwd_op, (*detached, ds, False, True))
    torch.library.opcheck(op.core_bwd_op, (*detached, ds, True, False))


def test_core_bwd_rejects_bad_grad_output():
    q, k, u, v, r = core_inputs(3, 2, 2, 32, 2, 16, torch.float32, seed=14)
    with pytest.raises(ValueError, match="ds: expected shape"):
        op.core_backward(q, k, u, v, r, torch.zeros(3, 2, 16))
    with pytest.raises(ValueError, match="ds: expected dtype"):
        op.core_backward(q, k, u, v, r, torch.zeros(3, 2, 32, dtype=torch.float16))


def test_compile_fullgraph_backward_matches_eager():
    q, k, u, v, r = _leaves((10, 4, 2, 32, 3, 16), seed=15)
    w = torch.randn(10, 4, 32)

    def loss_fn(q, k, u, v, r):
        return (fm.flash_mhf(q, k, u, v, r) * w).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, u, v, r), (q, k, u, v, r))
    want = torch.autograd.grad(loss_fn(q, k, u, v, r), (q, k, u, v, r))
    for name, a, b in zip(GRADS, got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


# ---------------------------------------------------------------------------------- codegen


def test_backward_kinds_registered_with_distinct_spaces():
    assert {"bwd_dq", "bwd_dkuv", "bwd_fused"} <= set(KINDS)
    hashes = {get_kind(k).space_hash for k in ("bwd_dq", "bwd_dkuv", "bwd_fused")}
    assert len(hashes) == 3


@pytest.mark.parametrize("kind", ["bwd_dq", "bwd_dkuv", "bwd_fused"])
def test_defaults_fit_every_preset_and_render(kind):
    k = get_kind(kind)
    for p in fm.PRESETS.values():
        for dtype_name in DTYPES:
            spec = Spec(kind, *p.shape, dtype_name)
            for tokens in (1, 77, 4096, 16384):
                config = k.default(spec, tokens)
                assert k.reject(spec, config, tokens) is None, (p.name, dtype_name, tokens, config)
            compile(render(spec), f"<{kind}>", "exec")
    assert k.flops(Spec(kind, 16, 16, 128, 22, 256, "bf16"), 16384) > 0


def test_large_t_defaults_are_the_intended_tiles():
    spec = Spec("bwd_dq", 16, 16, 128, 22, 256, "bf16")
    # The H200 sweep with q/ds through descriptors: 128x64, 8 warps, 3 stages: 3.52 ms (2 stages: 3.92).
    assert get_kind("bwd_dq").default(spec, 16384) == dict(block_m=128, block_f=64, num_warps=8, num_stages=3)
    dkuv = get_kind("bwd_dkuv").default(Spec("bwd_dkuv", 16, 16, 128, 22, 256, "bf16"), 16384)
    # The H200 sweep: one kernel of 64x16 tiles, 4 warps: 6.49 ms; split forms 7.27 ms and slower.
    assert (dkuv["block_f"], dkuv["block_m"], dkuv["num_warps"], dkuv["split_dv"]) == (64, 16, 4, 0)


@pytest.mark.parametrize(
    "kind,config,reason",
    [
        ("bwd_dq", dict(block_m=64, block_f=128, num_warps=4, num_stages=2), "does not divide expert_dim"),
        ("bwd_dq", dict(block_m=256, block_f=32, num_warps=8, num_stages=1), "registers"),
        ("bwd_dq", dict(block_m=128, block_f=64, num_warps=8, num_stages=5), "shared memory"),
        ("bwd_dkuv", dict(block_f=128, block_m=64, num_warps=8, num_stages=2, split_dv=0, rows_major=0),
         "registers"),
        ("bwd_dkuv", dict(block_f=64, block_m=64, num_warps=4, num_stages=3, split_dv=1, rows_major=0),
         "registers"),
        ("bwd_dkuv", dict(block_f=64, block_m=128, num_warps=8, num_stages=4, split_dv=1, rows_major=1),
         "shared memory"),
        ("bwd_dkuv", dict(block_f=32, block_m=64, num_warps=4, num_stages=1, split_dv=0, rows_major=0),
         "larger than the 4 rows"),
    ],
)
def test_rejection_reasons(kind, config, reason):
    spec = Spec(kind, 8, 8, 128, 3, 384 if "divide" not in reason else 64, "bf16")
    tokens = 4 if "rows" in reason else None
    got = get_kind(kind).reject(spec, config, tokens)
    assert got is not None and reason in got, got
    with pytest.raises(SpecError, match=reason):
        get_kind(kind).check_config(spec, config, tokens)


def test_cli_show_backward_kinds():
    runner = CliRunner()
    result = runner.invoke(cli_main, ["show", "--preset", "repo-128m", "--kind", "bwd_dq"])
    assert result.exit_code == 0, result.output
    assert "def flashmhf_bwd_dq(" in result.output and "kind=bwd_dq" in result.output
    assert "# default launch config at 1 tokens on sm_90: block_m=16,block_f=64,num_warps=4" in result.output
    result = runner.invoke(cli_main, ["show", "--preset", "repo-128m", "--kind", "bwd_dq", "--capability", "80"])
    assert "# default launch config at 1 tokens on sm_80: block_m=16,block_f=32,num_warps=8" in result.output
    for kind in ("bwd_dkuv", "bwd_fused"):
        result = runner.invoke(cli_main, ["show", "--preset", "repo-1.3b", "--kind", kind, "--tokens", "16384"])
        assert result.exit_code == 0 and f"def flashmhf_{kind}(" in result.output
    bad = '{"block_f": 128, "block_m": 64, "num_warps": 8, "num_stages": 2, "split_dv": 0, "rows_major": 0}'
    result = runner.invoke(cli_main, ["show", "--preset", "repo-1.3b", "--kind", "bwd_dkuv", "--config", bad])
    assert result.exit_code != 0 and "registers" in result.output and "Traceback" not in result.output
