"""Forward kernel under the interpreter against the float64 reference."""

from __future__ import annotations

import zlib

import pytest
import torch

import flashmhf_runtime as fm
from flashmhf.codegen import Spec, get_kind, load
from tests.helpers import POISON, TOLERANCE, core_inputs, misaligned, reference_core, rel_error

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (tokens, H, H_kv, d_h, E, d_e): T = 1, T not a multiple of any tile, d_h 96/128, d_e 384, H_kv < H.
SHAPES = [
    (1, 2, 2, 128, 2, 256),
    (37, 4, 2, 96, 3, 64),
    (19, 2, 1, 128, 2, 384),
    (53, 3, 3, 96, 2, 384),
    (5, 4, 1, 64, 3, 32),
]
CONFIGS = [
    dict(block_m=16, block_f=16, num_warps=4, num_stages=1, split=1, tma=0),
    dict(block_m=32, block_f=32, num_warps=4, num_stages=2, split=1, tma=1),  # K/U/V through descriptors
    dict(block_m=16, block_f=32, num_warps=4, num_stages=2, split=3, tma=0),
    dict(block_m=64, block_f=64, num_warps=8, num_stages=3, split=2, tma=1),
]


def _valid(shape, config, dtype_name="fp32") -> bool:
    return get_kind("fwd").reject(Spec("fwd", *shape[1:], dtype_name), config, None) is None


def _run_kernel(shape, dtype_name, config, seed):
    tokens, h, h_kv, d_h, e, d_e = shape
    dtype = DTYPES[dtype_name]
    spec = Spec("fwd", h, h_kv, d_h, e, d_e, dtype_name)
    q, k, u, v, r = core_inputs(tokens, h, h_kv, d_h, e, d_e, dtype, seed=seed)
    out = torch.full((tokens, h, d_h), POISON, dtype=dtype)
    load(spec).launch(q, k, u, v, r, out, **config)
    return rel_error(out, reference_core(q, k, u, v, r)), TOLERANCE[dtype]


def _shape_id(s) -> str:
    return "T{}_H{}-{}_dh{}_E{}x{}".format(*s)


def _config_id(c) -> str:
    return f"m{c['block_m']}f{c['block_f']}s{c['split']}t{c['tma']}"


@pytest.mark.parametrize(
    "shape,config",
    [pytest.param(s, c, id=f"{_shape_id(s)}-{_config_id(c)}") for s in SHAPES for c in CONFIGS if _valid(s, c)],
)
def test_forward_fp32(shape, config):
    err, tol = _run_kernel(shape, "fp32", config, seed=zlib.crc32(repr((shape, config)).encode()))
    assert err <= tol, err


@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=_shape_id)
def test_forward_half(shape, dtype_name):
    configs = [c for c in CONFIGS[:3] if _valid(shape, c, dtype_name)]  # one of them with tma=1
    assert len(configs) >= 2
    for config in configs:
        err, tol = _run_kernel(shape, dtype_name, config, seed=7)
        assert err <= tol, (config, err)


def test_tma_forward_takes_weights_that_start_off_a_16_byte_boundary():
    """TMA descriptors need 16-byte aligned bases: a misaligned (contiguous) K/U/V view still works."""
    shape = (13, 2, 2, 64, 2, 32)
    spec = Spec("fwd", *shape[1:], "fp32")
    q, k, u, v, r = core_inputs(*shape, torch.float32, seed=11)
    k_off, u_off, v_off = (misaligned(w) for w in (k, u, v))
    out = torch.full_like(q, POISON)
    load(spec).launch(q, k_off, u_off, v_off, r, out, block_m=16, block_f=16, num_warps=4, num_stages=1, split=2,
                      tma=1)
    assert rel_error(out, reference_core(q, k, u, v, r)) <= 1e-4


def test_a_config_pinned_before_the_tma_param_existed_still_runs():
    q, k, u, v, r = core_inputs(9, 2, 2, 64, 2, 32, torch.float32, seed=14)
    old = dict(block_m=16, block_f=16, num_warps=4, num_stages=1, split=2)  # no "tma": runs as tma=0
    assert rel_error(fm.flash_mhf(q, k, u, v, r, config=old), reference_core(q, k, u, v, r)) <= 1e-4
    with pytest.raises(ValueError, match="block_m"):  # other keys are still required
        fm.flash_mhf(q, k, u, v, r, config={"tma": 0})


def test_every_element_written_and_fresh_inputs_differ():
    """Two different random inputs give different outputs: the kernel is not caching or constant."""
    shape = (9, 2, 2, 64, 2, 32)
    spec = Spec("fwd", 2, 2, 64, 2, 32, "fp32")
    config = dict(block_m=16, block_f=16, num_warps=4, num_stages=1, split=2, tma=0)
    outs = []
    for seed in (1, 2):
        q, k, u, v, r = core_inputs(*shape, torch.float32, seed=seed)
        out = torch.full((9, 2, 64), POISON)
        load(spec).launch(q, k, u, v, r, out, **config)
        assert torch.isfinite(out).all()
        outs.append(out)
    assert not torch.allclose(outs[0], outs[1])


def test_public_op_leading_dims_default_config_and_r_dtype():
    q, k, u, v, r = core_inputs(0, 4, 2, 96, 3, 64, torch.float32, seed=3, lead=(2, 7))
    s = fm.flash_mhf(q, k, u, v, r)
    assert s.shape == q.shape and s.dtype == q.dtype
    assert rel_error(s, reference_core(q, k, u, v, r)) <= 1e-4
    q16, k16, u16, v16, r16 = (t.to(torch.float16) for t in (q, k, u, v, r))  # r in q's dtype is allowed
    s16 = fm.flash_mhf(q16, k16, u16, v16, r16)
    assert rel_error(s16, reference_core(q16, k16, u16, v16, r16)) <= 3e-3


def test_public_op_strided_q_without_copy():
    """q as it comes out of x @ W_in.T viewed (T, H, d_h) from a wider buffer (non-contiguous tokens)."""
    q, k, u, v, r = core_inputs(11, 2, 2, 64, 2, 32, torch.float32, seed=4)
    wide = torch.randn(11, 3, 2, 64)
    wide[:, 1] = q
    q_view = wide[:, 1]
    assert not q_view.is_contiguous()
    s = fm.flash_mhf(q_view, k, u, v, r)
    assert rel_error(s, reference_core(q, k, u, v, r)) <= 1e-4


def test_zero_tokens():
    q, k, u, v, r = core_inputs(0, 2, 2, 64, 2, 32, torch.float32, seed=5)
    assert fm.flash_mhf(q, k, u, v, r).shape == (0, 2, 64)


def test_fast_path_reuses_validation_but_not_results():
    """Second call with the same signature takes the memoised path: fresh inputs, fresh correct output."""
    from flashmhf_runtime import op

    for seed in (11, 12, 13):
        q, k, u, v, r = core_inputs(0, 2, 2, 64, 2, 32, torch.float32, seed=seed, lead=(3, 5))
        s = fm.flash_mhf(q, k, u, v, r)
        assert rel_error(s, reference_core(q, k, u, v, r)) <= 1e-4
    assert any(sig[0] == q.shape for sig in op._fast_plans)
    # A different, invalid signature still gets the full validation.
    with pytest.raises(ValueError, match="r: expected shape"):
        fm.flash_mhf(q, k, u, v, r[..., :1])
