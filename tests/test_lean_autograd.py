"""The layer's head RMSNorm and router with hand-written backwards: the reference's values and
gradients (float64 gradcheck too), and nothing of q's size saved in fp32 for backward."""

from __future__ import annotations

import pytest
import torch

import flashmhf_runtime as fm
from flashmhf.bench.layer import saved_bytes_by_dtype
from flashmhf_runtime import lean_autograd, reference


def _q(dtype=torch.float64, shape=(5, 3, 4, 8)):
    torch.manual_seed(0)
    return (torch.randn(shape, dtype=torch.float64) * 2).to(dtype).requires_grad_()


def test_gradcheck_float64():
    q = _q()
    w = torch.rand(4, 8, dtype=torch.float64).add(0.5).requires_grad_()
    wr = (torch.randn(4, 8, 6, dtype=torch.float64) * 0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: lean_autograd.head_rms_norm(a, b, 1e-5), (q, w))
    assert torch.autograd.gradcheck(lean_autograd.router, (q, wr))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_match_the_reference(dtype):
    q = _q(dtype)
    w = torch.rand(4, 8).add(0.5).to(dtype).requires_grad_()
    wr = (torch.randn(4, 8, 6) * 0.3).to(dtype).requires_grad_()
    for lean, ref, weight in ((lambda a, b: lean_autograd.head_rms_norm(a, b), reference.head_rms_norm, w),
                              (lean_autograd.router, reference.router, wr)):
        out, want = lean(q, weight), ref(q, weight)
        assert out.dtype == want.dtype
        dy = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, weight), dy)
        exp = torch.autograd.grad(want, (q, weight), dy)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert torch.allclose(out.float(), want.float(), rtol=tol, atol=tol)
        for g, e in zip(got, exp):
            assert g.dtype == e.dtype
            assert ((g.float() - e.float()).norm() / e.float().norm()).item() <= tol


def test_the_layer_saves_no_fp32_copy_of_q():
    torch.manual_seed(0)
    layer = fm.FlashMHF(64, 4, 96, 3, head_norm=True, dtype=torch.bfloat16)
    layer.core_fn = reference.flash_mhf  # the core's own saved tensors are not what this checks
    x = torch.randn(128, 64, dtype=torch.bfloat16, requires_grad=True)
    q_fp32 = 128 * 64 * 4  # bytes of one fp32 copy of q

    def plain_norm_and_router():
        q = layer.w_in(x).unflatten(-1, (layer.n_heads, layer.head_dim))
        q = reference.head_rms_norm(q, layer.head_norm.weight)
        return reference.router(q, layer.router)

    # Plain torch ops keep several fp32 copies of q; the layer keeps only per-row statistics and
    # r (T x H x E) in fp32.
    assert saved_bytes_by_dtype(plain_norm_and_router).get(torch.float32, 0) >= 3 * q_fp32
    assert saved_bytes_by_dtype(lambda: layer(x)).get(torch.float32, 0) < q_fp32
