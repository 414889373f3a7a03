"""flashmhf.bench.layer on CPU (the core under the interpreter): its float64 check of the whole
layer passes for the real layer, fails for a wrong one, and its training step returns every gradient."""

from __future__ import annotations

import torch

import flashmhf_runtime as fm
from flashmhf.bench.layer import CHECK_TOKENS, layer_error, reference_layer, training_step
from flashmhf_runtime import reference


def _layer(**kw) -> fm.FlashMHF:
    torch.manual_seed(0)
    layer = fm.FlashMHF(32, 2, 48, 3, **kw)
    with torch.no_grad():
        if layer.head_norm is not None:
            layer.head_norm.weight.uniform_(0.5, 1.5)
    return layer


def test_layer_error_is_small_for_the_layer_and_large_for_a_wrong_core():
    layer = _layer(head_norm=True, n_kv_heads=1)
    x, dy = torch.randn(2, 37, 32), torch.randn(2, 37, 32)  # leading dims: the layer is position-wise
    assert layer_error(layer, x, None) <= 1e-4
    assert layer_error(layer, x, dy) <= 1e-3
    layer.core_fn = lambda q, k, u, v, r: 1.05 * fm.flash_mhf(q, k, u, v, r)
    assert layer_error(layer, x, None) > 0.02 and layer_error(layer, x, dy) > 0.02


def test_reference_layer_is_a_float64_copy_with_the_reference_core():
    layer = _layer()
    ref = reference_layer(layer)
    assert ref.core_fn is reference.flash_mhf and layer.core_fn is None
    assert all(p.dtype == torch.float64 for p in ref.parameters())
    assert all(p.dtype == torch.float32 for p in layer.parameters())  # the original is untouched


def test_training_step_returns_the_gradient_of_the_input_and_of_every_weight():
    layer = _layer(head_norm=True)
    x = torch.randn(9, 32, requires_grad=True)
    dy = torch.randn(9, 32)
    grads = training_step(layer, x, dy)
    names = [n for n, _ in layer.named_parameters()]
    assert len(grads) == 1 + len(names)
    ref = reference_layer(layer)
    x64 = x.detach().double().requires_grad_()
    want = torch.autograd.grad(ref(x64), (x64, *ref.parameters()), dy.double())
    for name, g, w in zip(["x", *names], grads, want):
        assert g.shape == w.shape, name
        assert ((g.double() - w).norm() / w.norm()).item() <= 1e-3, name


def test_only_the_first_tokens_are_checked():
    # Position-wise layer: a corrupted token after CHECK_TOKENS cannot change the check's inputs.
    layer = _layer()
    x = torch.randn(CHECK_TOKENS + 3, 32)
    y = x.clone()
    y[-1] = float("nan")
    assert layer_error(layer, x, None) == layer_error(layer, y, None)


def test_a_layer_torch_cannot_compile_is_reported_not_fatal():
    import pytest

    from flashmhf.bench.layer import _compiled

    def step(module):
        raise RuntimeError("no backend here")

    with pytest.warns(UserWarning, match="torch.compile of the FlashMHF layer failed: RuntimeError: no backend"):
        assert _compiled(torch.nn.Linear(2, 2), step) is None


def test_paired_medians_alternate_the_two_sides_and_take_each_ones_median(monkeypatch):
    from flashmhf.bench import timing

    calls = []
    times = {"a": iter([5.0, 1.0, 3.0]), "b": iter([2.0, 9.0, 4.0])}

    def fake_median_ms(fn, *, graph, rep):
        calls.append(fn())
        return next(times[calls[-1]])

    monkeypatch.setattr(timing, "median_ms", fake_median_ms)
    assert timing.paired_median_ms(lambda: "a", lambda: "b", rounds=3) == (3.0, 4.0)
    assert calls == ["a", "b", "a", "b", "a", "b"]
