"""The op's backward runs bwd_dkuv on a side stream next to bwd_dq on CUDA: same gradients as the two
kernels one after the other, safe under CUDA-graph capture, and the current stream ends up ordered
after both kernels."""

import pytest
import torch

import flashmhf_runtime as fm
from flashmhf.checks import rel_error
from flashmhf_runtime import op
from tests.helpers import core_inputs

# H 4, H_kv 2, d_h 64, E 3, d_e 64: enough d_ff tiles and rows that the two kernels really overlap.
SHAPE = (4, 2, 64, 3, 64)
TOKENS = 2053  # not a multiple of any tile


def _grads(tensors, ds):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    return torch.autograd.grad(fm.flash_mhf(*leaves), leaves, ds)


def _inputs(seed):
    q, k, u, v, r = core_inputs(TOKENS, *SHAPE, torch.bfloat16, seed=seed, device="cuda")
    ds = torch.randn_like(q)
    return (q, k, u, v, r), ds


@pytest.mark.gpu
def test_two_stream_backward_matches_the_serial_one_on_gpu():
    tensors, ds = _inputs(seed=3)
    assert op.BACKWARD_ON_TWO_STREAMS
    side_by_side = _grads(tensors, ds)
    op.BACKWARD_ON_TWO_STREAMS = False
    try:
        serial = _grads(tensors, ds)
    finally:
        op.BACKWARD_ON_TWO_STREAMS = True
    for a, b in zip(side_by_side, serial):
        assert torch.equal(a, b)  # same kernels, same configs, no atomics: bit-identical


@pytest.mark.gpu
def test_current_stream_waits_for_the_side_stream_on_gpu():
    # Read the gradients on the current stream right away, without a synchronize: if the join were
    # missing, dk, du, dv (written on the side stream) would be read while bwd_dkuv still runs.
    tensors, ds = _inputs(seed=4)
    op.BACKWARD_ON_TWO_STREAMS = False
    try:
        expected = [g.float().abs().sum() for g in _grads(tensors, ds)]
    finally:
        op.BACKWARD_ON_TWO_STREAMS = True
    torch.cuda.synchronize()
    for _ in range(3):
        sums = [g.float().abs().sum() for g in _grads(tensors, ds)]
        torch.cuda.synchronize()
        for got, want in zip(sums, expected):
            assert torch.equal(got, want) and want > 0


@pytest.mark.gpu
def test_fwd_bwd_with_the_side_stream_captures_in_a_cuda_graph_on_gpu():
    tensors, ds = _inputs(seed=5)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]

    def step():
        return torch.autograd.grad(fm.flash_mhf(*leaves), leaves, ds)

    eager = step()
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        step()
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for g in captured:
        g.fill_(float("nan"))  # poison: the replay must write every gradient
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert rel_error(a, b) == 0.0


@pytest.mark.gpu
def test_compiled_fwd_bwd_with_the_side_stream_matches_eager_on_gpu():
    tensors, ds = _inputs(seed=6)
    eager = _grads(tensors, ds)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    compiled = torch.compile(fm.flash_mhf, fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves, ds)
    for a, b in zip(got, eager):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_backward_of_a_sum_with_its_expanded_gradient_on_gpu():
    # s.sum().backward() hands the op an expanded ds (row stride 0): the TMA descriptors over ds
    # need real rows, so it is copied first. Compared with the float64 reference's gradients.
    tensors, _ = _inputs(seed=7)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    fm.flash_mhf(*leaves).sum().backward()
    ref = [t.detach().double().cpu().requires_grad_() for t in tensors]
    fm.reference.flash_mhf(*ref).sum().backward()
    for got, want in zip(leaves, ref):
        assert rel_error(got.grad.cpu(), want.grad) <= 2e-2
