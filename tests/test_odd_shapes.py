"""Every layer shape runs: d_e and d_h the templates do not take directly run on the kernels of the
next larger widths (zero-padded tensors), forward and backward, against float64; wider heads run on
the reference with one warning; nothing reaches the user as an AssertionError."""

from __future__ import annotations

import warnings

import pytest
import torch

import flashmhf_runtime as fm
from flashmhf.codegen import Spec
from flashmhf.codegen.spec import kernel_dims
from flashmhf_runtime import dispatch, reference
from tests.helpers import TOLERANCE, core_inputs, rel_error

GRAD_TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}

# (tokens, H, H_kv, d_h, E, d_e)
ODD = [
    (5, 2, 2, 24, 2, 17),  # d_h 24 (masked), d_e 17 (padded to 32)
    (7, 2, 1, 40, 2, 200),  # d_h 40, d_e 200 (padded to 208), 2 heads per kv head
    (3, 4, 2, 20, 2, 40),  # d_h 20 (padded to 24), d_e 40 (padded to 48)
    (4, 2, 2, 96, 3, 16),  # d_h 96: masked, not padded
]


def _grads_f64(q, k, u, v, r, ds):
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, u, v, r)]
    s = reference.flash_mhf(*leaves)
    return s.detach(), torch.autograd.grad(s, leaves, ds.double())


def _case_id(case) -> str:
    return "T{}-H{}-kv{}-d{}-E{}x{}".format(*case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ODD, ids=_case_id)
def test_odd_shapes_run_on_the_kernels_forward_and_backward(case, dtype):
    tokens, h, h_kv, d_h, e, d_e = case
    dispatch.reset()
    q, k, u, v, r = core_inputs(tokens, h, h_kv, d_h, e, d_e, dtype, seed=1)
    for t in (q, k, u, v, r):
        t.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no reference fallback, no warning
        s = fm.flash_mhf(q, k, u, v, r)
        ds = torch.randn_like(s)
        grads = torch.autograd.grad(s, (q, k, u, v, r), ds)
    assert s.shape == q.shape and [g.shape for g in grads] == [t.shape for t in (q, k, u, v, r)]
    ref, ref_grads = _grads_f64(q, k, u, v, r, ds)
    assert rel_error(s, ref) <= TOLERANCE[dtype], rel_error(s, ref)
    for name, g, g_ref in zip("qkuvr", grads, ref_grads):
        assert rel_error(g, g_ref) <= GRAD_TOLERANCE[dtype], (name, rel_error(g, g_ref))
    d_h_k, d_e_k = kernel_dims(d_h, d_e)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    for kind in ("fwd", "bwd_dq", "bwd_dkuv"):  # the kernels ran, on the padded shape
        assert dispatch.chosen_config(Spec(kind, h, h_kv, d_h_k, e, d_e_k, name), tokens, None), kind


def test_the_inference_path_pads_too():
    q, k, u, v, r = core_inputs(6, 2, 2, 20, 2, 17, torch.float32, seed=2)
    ref = reference.flash_mhf(*(t.double() for t in (q, k, u, v, r)))
    for _ in range(2):  # the second call is the one a fast path would serve
        assert rel_error(fm.flash_mhf(q, k, u, v, r), ref) <= 1e-4
    lead = core_inputs(6, 2, 2, 20, 2, 17, torch.float32, seed=2, lead=(2, 3))
    assert fm.flash_mhf(*lead).shape == (2, 3, 2, 20)


def test_heads_wider_than_a_tile_run_on_the_reference_with_one_warning():
    q, k, u, v, r = core_inputs(3, 2, 2, 264, 2, 16, torch.float32, seed=3)
    q.requires_grad_(True)
    with pytest.warns(UserWarning, match="d_h=264.*at most 256.*reference"):
        s = fm.flash_mhf(q, k, u, v, r)
    assert rel_error(s, reference.flash_mhf(*(t.detach().double() for t in (q, k, u, v, r)))) <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # said once for the shape, backward included
        fm.flash_mhf(q, k, u, v, r)
        (dq,) = torch.autograd.grad(s.sum(), q)
    assert dq.shape == q.shape and torch.isfinite(dq).all()


@pytest.mark.parametrize("d_model, n_heads, d_ff, n_experts, kv", [
    (48, 2, 34, 2, 2),  # d_h 24, d_e 17
    (80, 2, 400, 2, 1),  # d_h 40, d_e 200, H_kv < H
    (40, 2, 80, 2, 2),  # d_h 20, d_e 40
])
def test_the_layer_takes_odd_widths(d_model, n_heads, d_ff, n_experts, kv):
    torch.manual_seed(0)
    layer = fm.FlashMHF(d_model, n_heads, d_ff, n_experts, n_kv_heads=kv)
    x = torch.randn(2, 3, d_model, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    assert y.shape == x.shape and x.grad is not None and layer.k.grad.shape == layer.k.shape
    layer.core_fn = lambda *a: reference.flash_mhf(*(t.double() for t in a)).to(a[0].dtype)
    assert rel_error(y.detach(), layer(x).detach()) <= 1e-4


def test_empty_dims_are_a_value_error():
    q, k, u, v, r = core_inputs(2, 2, 2, 16, 2, 16, torch.float32, seed=4)
    with pytest.raises(ValueError, match="q: expected H >= 1 heads of d_h >= 1"):
        fm.flash_mhf(q[..., :0], k[..., :0], u[..., :0], v[..., :0], r)
    with pytest.raises(ValueError, match="k: expected E >= 1 sub-networks of d_e >= 1"):
        fm.flash_mhf(q, k[:, :, :0], u[:, :, :0], v[:, :, :0], r)
