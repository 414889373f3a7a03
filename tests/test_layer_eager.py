"""The whole layer as one autograd node in eager mode (flashmhf_runtime.layer_eager).

It must compute what the modules compute (the general path: two nn.Linear calls around the layer
op), save no more, and stand aside whenever the modules would do something else (hooks, a bias,
wrapped projections, autocast).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flashmhf_runtime as fm
from flashmhf.bench.layer import saved_bytes_by_dtype
from flashmhf_runtime import layer_eager, layer_op
from tests.helpers import rel_error
from tests.test_layer_fused import float64_layer_and_grads


def make_layer(head_norm: bool = True, n_kv_heads: int | None = None, dtype=torch.float32) -> fm.FlashMHF:
    torch.manual_seed(0)
    layer = fm.FlashMHF(48, 3, 80, 5, head_norm=head_norm, n_kv_heads=n_kv_heads, dtype=dtype)
    with torch.no_grad():  # away from the init's ones and zeros
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def grads_of(layer: fm.FlashMHF, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, dict]:
    y = layer(x)
    wanted = [t for t in (x, *layer.parameters()) if t.requires_grad]
    grads = torch.autograd.grad(y, wanted, dy)
    names = (["x"] if x.requires_grad else []) + [n for n, p in layer.named_parameters() if p.requires_grad]
    return y, dict(zip(names, grads))


def general_path(monkeypatch) -> None:
    monkeypatch.setattr(layer_eager, "usable", lambda *args: False)


@pytest.mark.parametrize("head_norm,n_kv_heads,tokens", [(True, None, 37), (False, 1, 1), (True, 3, (2, 7))],
                         ids=["norm-T37", "nonorm-kv1-T1", "norm-batch2x7"])
def test_one_node_matches_the_modules_and_float64(head_norm, n_kv_heads, tokens, monkeypatch):
    layer = make_layer(head_norm, n_kv_heads)
    lead = tokens if isinstance(tokens, tuple) else (tokens,)
    x = torch.randn(*lead, 48, requires_grad=True)
    dy = torch.randn(*lead, 48)
    y, got = grads_of(layer, x, dy)
    assert type(y.grad_fn).__name__ == "_LayerBackward"  # one node for the whole layer
    want, want_grads = float64_layer_and_grads(layer, x, dy)
    assert rel_error(y, want) <= 1e-4
    assert set(got) == set(want_grads)
    for name, g in got.items():
        assert rel_error(g, want_grads[name]) <= 1e-4, name
    general_path(monkeypatch)
    y_modules, modules = grads_of(layer, x, dy)
    assert type(y_modules.grad_fn).__name__ != "_LayerBackward"
    assert torch.allclose(y, y_modules, rtol=1e-5, atol=1e-6)
    for name, g in got.items():
        assert torch.allclose(g, modules[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("trainable", [("x",), ("w_in.weight", "w_out.weight"), ("k", "u", "v"),
                                       ("router", "head_norm.weight")],
                         ids=["x-only", "projections-only", "kuv-only", "router-norm-only"])
def test_only_the_gradients_asked_for(trainable):
    layer = make_layer()
    for name, p in layer.named_parameters():
        p.requires_grad_(name in trainable)
    x = torch.randn(9, 48, requires_grad="x" in trainable)
    dy = torch.randn(9, 48)
    y, got = grads_of(layer, x, dy)
    _, want_grads = float64_layer_and_grads(layer, x, dy)
    assert set(got) == set(trainable)
    for name, g in got.items():
        assert rel_error(g, want_grads[name]) <= 1e-4, name


def test_inference_builds_no_graph_and_matches():
    layer = make_layer()
    x = torch.randn(4, 48)
    with torch.no_grad():
        y = layer(x)
    assert y.grad_fn is None
    want, _ = float64_layer_and_grads(layer, x, torch.ones_like(x))
    assert rel_error(y, want) <= 1e-4


def test_saves_what_the_modules_saved(monkeypatch):
    layer = make_layer()
    x = torch.randn(64, 48, requires_grad=True)
    fused = saved_bytes_by_dtype(lambda: layer(x))
    general_path(monkeypatch)
    assert fused == saved_bytes_by_dtype(lambda: layer(x))


def _backward_peak_bytes(layer: fm.FlashMHF, x: torch.Tensor) -> int:
    """Peak of the CPU allocator's live bytes during one backward, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    y = layer(x)
    dy = torch.randn_like(y)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y.backward(dy)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    assert events, "the profiler recorded no allocations"
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_backward_peak_is_no_higher_than_the_modules(monkeypatch):
    # dx and the weight gradients are made after the core's backward has freed ds, as in the modules'
    # backward; made beside the core's dK/dU/dV kernel they raised a repo-1.3b step's peak by 133 MiB.
    layer = make_layer()
    x = torch.randn(512, 48, requires_grad=True)
    one_node = _backward_peak_bytes(layer, x)
    general_path(monkeypatch)
    assert one_node <= _backward_peak_bytes(layer, x)


def test_hooks_bias_wrappers_and_autocast_take_the_modules():
    layer = make_layer()
    x = torch.randn(5, 48, requires_grad=True)
    seen = []
    handle = layer.w_in.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    y = layer(x)
    handle.remove()
    assert seen == [(5, 48)] and type(y.grad_fn).__name__ != "_LayerBackward"

    biased = make_layer()
    biased.w_out = nn.Linear(48, 48, bias=True)
    with torch.no_grad():
        biased.w_out.weight.copy_(layer.w_out.weight)
        biased.w_out.bias.fill_(3.0)
    assert torch.allclose(biased(x), layer(x) + 3.0, rtol=1e-5, atol=1e-5)

    class Scaled(nn.Linear):  # e.g. an adapter: its forward must run
        def forward(self, t):
            return 2 * super().forward(t)

    wrapped = make_layer()
    wrapped.w_out = Scaled(48, 48, bias=False)
    with torch.no_grad():
        wrapped.w_out.weight.copy_(layer.w_out.weight)
    assert torch.allclose(wrapped(x), 2 * layer(x), rtol=1e-5, atol=1e-5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_amp = layer(x)
    assert y_amp.dtype == torch.bfloat16 and type(y_amp.grad_fn).__name__ != "_LayerBackward"


@pytest.mark.parametrize("need_q_side", [True, False])
def test_backward_hands_dq_to_then_once(need_q_side):
    layer = make_layer()
    q = torch.randn(11, 48)
    ds = torch.randn(11, 48)
    calls = []
    args = (q, layer.head_norm.weight.detach(), layer.router.detach(), layer.k.detach(), layer.u.detach(),
            layer.v.detach(), ds, 1e-5, need_q_side, True)
    grads = layer_op.layer_core_backward(*args, then=lambda dq: calls.append(dq))
    assert len(calls) == 1
    if need_q_side:
        assert calls[0] is not None and torch.equal(calls[0], grads[0])
    else:
        assert calls[0] is None and grads[0].numel() == 0
