"""The fused layer: generated head-norm/router kernels around the core (flashmhf_runtime.layer_op).

Kernels run under Triton's interpreter (conftest); "cpu-reference" is what CPU users without
TRITON_INTERPRET get (the same op in plain PyTorch). Everything is compared with float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import flashmhf_runtime as fm
from flashmhf.bench.layer import saved_bytes_by_dtype
from flashmhf.codegen import Spec, get_kind, render
from flashmhf.codegen.arch import INTERPRETER, SM80, SM90
from flashmhf.tuner.harness import make_problem
from flashmhf_runtime import layer_eager, layer_op, op, reference
from tests.helpers import rel_error

PATHS = ["interpreter", "cpu-reference"]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 3e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def use_path(path: str, monkeypatch) -> None:
    if path == "cpu-reference":
        monkeypatch.setattr(op, "_INTERPRET", False)


# ------------------------------------------------------------------------------ the kernels alone


@pytest.mark.parametrize("kind", ["norm_router", "router", "norm_router_bwd", "router_bwd"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "h,d_h,e,tokens", [(3, 48, 5, 37), (2, 64, 22, 1), (4, 32, 40, 130)], ids=["dh48-E5-T37", "E22-T1", "E40-T130"]
)
def test_kernels_match_float64(kind, dtype, h, d_h, e, tokens):
    spec = Spec(kind, h, h, d_h, e, 16, dtype)
    problem = make_problem(spec, tokens, "cpu", seed=tokens)
    config = get_kind(kind).default(spec, tokens)
    assert problem.check(config) <= problem.tolerance  # outputs were poisoned with NaN first


@pytest.mark.parametrize("config", [{"block_t": 16, "split": 4, "num_warps": 2}, {"block_t": 32, "split": 1,
                                                                                  "num_warps": 4}])
def test_backward_split_is_deterministic_and_right(config):
    spec = Spec("norm_router_bwd", 2, 2, 32, 6, 16, "fp32")
    problem = make_problem(spec, 100, "cpu", seed=3)
    assert problem.check(config) <= problem.tolerance
    first = [t.clone() for t in problem.outputs]
    problem.check(config)
    assert all(torch.equal(a, b) for a, b in zip(first, problem.outputs))


def test_kinds_render_and_describe_their_variant():
    norm = render(Spec("norm_router", 4, 2, 96, 22, 256, "bf16"))
    plain = render(Spec("router", 4, 2, 96, 22, 256, "bf16"))
    assert "Head RMSNorm: yes" in norm and "rsqrt" in norm
    assert "Head RMSNorm: no" in plain and "rsqrt" not in plain
    assert "E_PAD = tl.constexpr(32)" in norm
    bwd = render(Spec("norm_router_bwd", 4, 2, 96, 22, 256, "bf16"))
    assert "flashmhf_norm_router_bwd_reduce" in bwd


def test_backward_default_fills_the_gpu_but_not_past_the_blocks():
    kind = get_kind("norm_router_bwd")
    spec = Spec("norm_router_bwd", 16, 16, 128, 22, 256, "bf16")
    assert kind.default(spec, 1)["split"] == 1
    big = kind.default(spec, 16384)
    assert big["split"] * spec.n_heads >= 132 and kind.reject(spec, big, 16384) is None
    assert kind.reject(spec, {"block_t": 64, "split": 8, "num_warps": 4}, 100) is not None  # 2 blocks only


@pytest.mark.parametrize("kind", ["norm_router_core", "router_core"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "h,h_kv,d_h,e,d_e,tokens,split",
    [(4, 2, 24, 3, 32, 1, 3), (2, 2, 32, 5, 16, 37, 1), (4, 4, 16, 2, 48, 19, 2)],
    ids=["dh24-kv2-T1-split3", "E5-T37-nosplit", "de48-T19-split2"],
)
def test_one_kernel_forward_matches_float64_and_leaves_its_counters_zeroed(kind, dtype, h, h_kv, d_h, e, d_e,
                                                                          tokens, split):
    """Norm, router and core in one kernel, the split's partials summed by the last program of each
    row tile: right on a d_h that is masked, H_kv < H, T = 1 and a split that does not divide the
    d_ff tiles; its counters are zero again afterwards, so a second launch on them is right too."""
    spec = Spec(kind, h, h_kv, d_h, e, d_e, dtype)
    problem = make_problem(spec, tokens, "cpu", seed=tokens)
    config = {"block_m": 16, "block_f": 16, "num_warps": 4, "num_stages": 1, "split": split}
    assert get_kind(kind).reject(spec, config, tokens, INTERPRETER) is None
    assert problem.check(config) <= problem.tolerance  # output poisoned with NaN first
    counters = problem.args[-1]
    assert counters.numel() >= -(-tokens * spec.group // 16) * h_kv and not counters.any()
    first = problem.outputs[0].clone()
    assert problem.check(config) <= problem.tolerance
    assert torch.equal(first, problem.outputs[0]) and not counters.any()


def test_one_kernel_forward_defaults_split_at_decode_only():
    spec = Spec("norm_router_core", 16, 16, 128, 22, 256, "bf16")
    kind = get_kind("norm_router_core")
    assert kind.default(spec, 1, SM90)["split"] > 1 and kind.default(spec, 16384, SM90)["split"] == 1
    for arch in (SM80, SM90):
        for tokens in (1, 64, 1024):
            assert kind.reject(spec, kind.default(spec, tokens, arch), tokens, arch) is None
    assert "Head RMSNorm: yes" in render(spec) and "rsqrt" not in render(Spec("router_core", *spec.as_tuple()[1:]))


# ------------------------------------------------------------------------------ the layer


def make_layer(dtype, *, head_norm: bool, n_kv_heads=None, seed=0) -> fm.FlashMHF:
    torch.manual_seed(seed)
    # d_model 48 = 3 heads of 16; d_ff 80 = 5 sub-networks of 16: nothing is a power of two.
    layer = fm.FlashMHF(48, 3, 80, 5, n_kv_heads=n_kv_heads, head_norm=head_norm, dtype=dtype)
    with torch.no_grad():
        if layer.head_norm is not None:
            layer.head_norm.weight.uniform_(0.5, 1.5)
        layer.router.normal_(0, 0.3)  # a router that does not sit at 1/E
    return layer


def float64_layer_and_grads(layer: fm.FlashMHF, x: torch.Tensor, dy: torch.Tensor):
    params = {n: t.detach().double().requires_grad_() for n, t in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    y = reference.layer(x64, params["w_in.weight"], params["w_out.weight"], params["k"], params["u"], params["v"],
                        params["router"], params.get("head_norm.weight"))
    grads = torch.autograd.grad(y, (x64, *params.values()), dy.double())
    return y, dict(zip(["x", *params], grads))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("head_norm,n_kv_heads,tokens", [(True, None, 1), (True, 1, 37), (False, None, 37),
                                                         (False, 1, 1)], ids=["norm-T1", "norm-kv1-T37",
                                                                              "nonorm-T37", "nonorm-kv1-T1"])
def test_layer_and_every_gradient_match_float64(path, dtype, head_norm, n_kv_heads, tokens, monkeypatch):
    use_path(path, monkeypatch)
    layer = make_layer(dtype, head_norm=head_norm, n_kv_heads=n_kv_heads)
    x = torch.randn(tokens, 48).to(dtype).requires_grad_()
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    want, want_grads = float64_layer_and_grads(layer, x, dy)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_error(y, want) <= TOL[dtype]
    got = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    assert set(got) == set(want_grads)
    for name, g in got.items():
        assert g is not None and g.dtype == dtype, name
        assert rel_error(g, want_grads[name]) <= GRAD_TOL[dtype], name


def test_batched_input_and_no_tokens():
    layer = make_layer(torch.float32, head_norm=True)
    x = torch.randn(2, 5, 48, requires_grad=True)
    y = layer(x)
    want = reference.layer(x.double(), *[p.double() for p in (layer.w_in.weight, layer.w_out.weight, layer.k,
                                                               layer.u, layer.v, layer.router,
                                                               layer.head_norm.weight)])
    assert y.shape == (2, 5, 48) and rel_error(y, want) <= 1e-4
    empty = torch.randn(0, 48, requires_grad=True)
    out = layer(empty)
    out.sum().backward()
    assert out.shape == (0, 48)
    assert torch.count_nonzero(layer.router.grad) == 0 and torch.count_nonzero(layer.head_norm.weight.grad) == 0


@pytest.mark.parametrize("path", PATHS)
def test_eager_function_and_custom_op_agree(path, monkeypatch):
    use_path(path, monkeypatch)
    layer = make_layer(torch.float32, head_norm=True, n_kv_heads=1)
    q = torch.randn(9, 48, requires_grad=True)
    weights = [layer.head_norm.weight, layer.router, layer.k, layer.u, layer.v]
    results = []
    for fn in (layer_op.layer_core, lambda *a: layer_op.layer_core_op(*a, 1e-5)):
        s = fn(q, *weights)
        grads = torch.autograd.grad(s, (q, *weights), torch.ones_like(s))
        results.append((s, grads))
    (s1, g1), (s2, g2) = results
    assert torch.equal(s1, s2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_only_some_gradients_asked_for():
    layer = make_layer(torch.float32, head_norm=True)
    q = torch.randn(7, 48)
    weights = [layer.head_norm.weight, layer.router, layer.k, layer.u, layer.v]
    s = layer_op.layer_core(q, *weights)
    (dk,) = torch.autograd.grad(s, (layer.k,), torch.ones_like(s))
    (dw_r,) = torch.autograd.grad(layer_op.layer_core(q, *weights), (layer.router,), torch.ones_like(s))
    full = torch.autograd.grad(layer_op.layer_core(q, *weights), (layer.router, layer.k), torch.ones_like(s))
    assert torch.allclose(dk, full[1]) and torch.allclose(dw_r, full[0])


@pytest.mark.parametrize("head_norm", [True, False], ids=["norm", "nonorm"])
def test_opcheck(head_norm):
    layer = make_layer(torch.float32, head_norm=head_norm, n_kv_heads=1)
    q = torch.randn(5, 48, requires_grad=True)
    norm_w = layer.head_norm.weight if head_norm else None
    args = [q, norm_w, layer.router, layer.k, layer.u, layer.v, 1e-5]
    torch.library.opcheck(layer_op.layer_core_op, args)
    detached = [None if t is None else t.detach() for t in args[:6]]
    ds = torch.randn(5, 48)
    torch.library.opcheck(layer_op.layer_core_bwd_op, (*detached, ds, 1e-5, True, True))
    torch.library.opcheck(layer_op.layer_core_bwd_op, (*detached, ds, 1e-5, False, True))


def test_autocast_takes_the_hidden_states_dtype():
    layer = make_layer(torch.float32, head_norm=True)
    x = torch.randn(6, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    assert rel_error(y, reference_output(layer, x)) <= 3e-2


def reference_output(layer, x):
    p = {n: t.detach().double() for n, t in layer.named_parameters()}
    return reference.layer(x.detach().double(), p["w_in.weight"], p["w_out.weight"], p["k"], p["u"], p["v"],
                           p["router"], p.get("head_norm.weight"))


def test_saves_only_x_q_and_s():
    """Per layer, backward keeps x (W_in's input), q and s (W_out's input), nothing of the norm,
    router or core (they are recomputed), besides the weights."""
    layer = make_layer(torch.bfloat16, head_norm=True)
    x = torch.randn(64, 48, dtype=torch.bfloat16, requires_grad=True)
    weights = sum(p.numel() * p.element_size() for p in layer.parameters())
    saved = saved_bytes_by_dtype(lambda: layer(x))
    activation = 64 * 48 * 2
    assert saved.get(torch.float32, 0) == 0
    assert saved[torch.bfloat16] <= 3 * activation + weights


def test_bad_inputs_name_the_argument():
    layer = make_layer(torch.float32, head_norm=True)
    w = [layer.head_norm.weight, layer.router, layer.k, layer.u, layer.v]
    with pytest.raises(ValueError, match="q: expected shape"):
        layer_op.layer_core(torch.randn(3, 40), *w)
    with pytest.raises(ValueError, match="norm_w: expected shape"):
        layer_op.layer_core(torch.randn(3, 48), torch.ones(3, 8), *w[1:])
    with pytest.raises(ValueError, match="k: expected dtype"):
        layer_op.layer_core(torch.randn(3, 48), w[0], w[1], w[2].double(), w[3], w[4])
    with pytest.raises(ValueError, match="w_r: expected a torch.Tensor"):
        layer_op.layer_core(torch.randn(3, 48), w[0], None, *w[2:])


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_decode_launches_the_fewest_kernels(tokens):
    """A layer call at decode sizes: W_in, the norm, router and core in one kernel, W_out, where the
    op runs the one kernel (at T = 1 always: three launches instead of five), else W_in, the
    norm/router kernel, the core's (with its split's reduction) and W_out."""
    from torch.profiler import ProfilerActivity, profile

    layer = fm.FlashMHF.from_preset("repo-1.3b", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, layer.d_model, device="cuda", dtype=torch.bfloat16)
    one_kernel = layer_op._fused_kind(True, (16, 16, 128, 22, 256, "bf16"), tokens, x.device)
    assert one_kernel == "norm_router_core" or tokens > 1
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            layer(x)
            torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    if one_kernel:
        assert len(kernels) == 3 and "norm_router_core" in kernels[1], kernels
    else:
        assert 4 <= len(kernels) <= 5 and "norm_router" in kernels[1], kernels


@pytest.mark.gpu
def test_one_kernel_decode_replays_in_a_cuda_graph_beside_eager_calls():
    """Captured, the one kernel gets its own zeroed counters and workspace (graph memory); replays
    interleaved with eager calls on the same stream (which use the stream's counters and scratch)
    both stay right, on fresh inputs each time."""
    layer = fm.FlashMHF.from_preset("repo-1.3b", device="cuda", dtype=torch.bfloat16)
    assert layer_op._fused_kind(True, (16, 16, 128, 22, 256, "bf16"), 1, torch.device("cuda", 0)) == \
        "norm_router_core"
    static_x = torch.randn(1, layer.d_model, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            layer(static_x)  # the fast path, its counters and scratch set up
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for _ in range(3):
            x = torch.randn(1, layer.d_model, device="cuda", dtype=torch.bfloat16)
            static_x.copy_(x)
            graph.replay()
            eager = layer(x)
            torch.cuda.synchronize()
            want = reference_output(layer, x)
            assert rel_error(static_y, want) <= 1e-2 and rel_error(eager, want) <= 1e-2


@pytest.mark.parametrize("head_norm", [True, False], ids=["norm", "nonorm"])
def test_decode_sizes_run_one_kernel_and_larger_ones_two(head_norm, monkeypatch):
    """Without tuned times the layer op runs its norm, router and core as one kernel up to
    FUSED_MAX_TOKENS tokens and as the norm/router kind and the core's kinds above; both are right,
    and a disabled one-kernel kind leaves every size to the two."""
    fm.reset()
    launched = []
    real_launch = layer_op._launch
    monkeypatch.setattr(layer_op, "_launch", lambda key, *a: launched.append(key[0]) or real_launch(key, *a))
    layer = make_layer(torch.float32, head_norm=head_norm, n_kv_heads=1)
    one, two = ("norm_router_core", "norm_router") if head_norm else ("router_core", "router")
    with torch.no_grad():
        for tokens, expected in ((1, one), (layer_op.FUSED_MAX_TOKENS, one), (layer_op.FUSED_MAX_TOKENS + 1, two)):
            launched.clear()
            x = torch.randn(tokens, 48)
            assert rel_error(layer(x), reference_output(layer, x)) <= 1e-4
            assert launched == [expected], (tokens, launched)
        monkeypatch.setattr(op, "DISABLED_KINDS", {one})
        fm.reset()
        launched.clear()
        x = torch.randn(1, 48)
        assert rel_error(layer(x), reference_output(layer, x)) <= 1e-4
        assert launched == [two]


def test_tuned_times_choose_between_one_kernel_and_two(monkeypatch):
    """Where the cache has the one kernel, the norm/router kind and the core's kind at the call's
    bucket, the one kernel runs if it measured faster than the other two together; at decode sizes
    also if it is slower by less than DECODE_GPU_MARGIN (host time rules there)."""
    times = {"norm_router_core": 0.020, "norm_router": 0.004, "fwd": 0.018}
    monkeypatch.setattr(op, "arch_of", lambda device: SM90)
    monkeypatch.setattr(op, "kind_for", lambda role, shape, n, device: "fwd" if role.name == "forward" else
                        "norm_router_core")
    monkeypatch.setattr(op, "tuned_ms", lambda kind, shape, bucket, index: times.get(kind) if bucket <= 64 else None)
    shape, cuda = (16, 16, 128, 22, 256, "bf16"), torch.device("cuda", 0)
    choose = layer_op._fused_kind.__wrapped__
    assert choose(True, shape, 16, cuda) == "norm_router_core"  # 0.020 < 0.022
    times["norm_router_core"] = 0.022 * (1 + layer_op.DECODE_GPU_MARGIN) * 0.99
    assert choose(True, shape, 16, cuda) == "norm_router_core"  # slower, within the margin
    times["norm_router_core"] = 0.022 * (1 + layer_op.DECODE_GPU_MARGIN) * 1.01
    assert choose(True, shape, 16, cuda) is None
    monkeypatch.setattr(op, "tuned_ms", lambda kind, shape, bucket, index: times.get(kind) if bucket <= 256 else None)
    times["norm_router_core"] = 0.023
    assert choose(True, shape, 256, cuda) is None  # above FUSED_MAX_TOKENS: the faster only
    times["norm_router_core"] = 0.021
    assert choose(True, shape, 256, cuda) == "norm_router_core"
    assert choose(True, shape, 1024, cuda) is None  # no times there: above FUSED_MAX_TOKENS, two kernels
    times.clear()
    assert choose(True, shape, 64, cuda) == "norm_router_core"  # no times: by size


@pytest.mark.parametrize("tokens", [11, layer_op.FUSED_MAX_TOKENS + 6], ids=["one-kernel", "two-steps"])
def test_repeated_forward_takes_the_fast_path_and_follows_the_weights(tokens, monkeypatch):
    layer = make_layer(torch.float32, head_norm=True)
    x = torch.randn(tokens, 48)
    with torch.no_grad():
        first = layer(x)
        kept = [per_t[tokens] for per_t in layer_op._fast_forward.values() if tokens in per_t]
        assert len(kept) == 1 and (kept[0][0] is None) == (tokens <= layer_op.FUSED_MAX_TOKENS)  # launchers kept
        calls = []
        real = layer_op.prepared_forward
        monkeypatch.setattr(layer_eager, "prepared_forward", lambda *a: calls.append(real(*a)) or calls[-1])
        again = layer(x)
        assert len(calls) == 1 and calls[0] is not None  # the fast path ran it
        layer.head_norm.weight.mul_(1.5)  # same signature, new values: the fast path must see them
        layer.router.add_(0.1)
        changed = layer(x)
    assert torch.equal(first, again)
    assert rel_error(changed, reference_output(layer, x)) <= 1e-4
    assert rel_error(first, reference_output(layer, x)) > 1e-3


@pytest.mark.parametrize("head_norm,n_kv_heads", [(True, None), (False, 1)], ids=["norm", "nonorm-kv1"])
def test_repeated_backward_takes_the_fast_path_and_follows_the_weights(head_norm, n_kv_heads, monkeypatch):
    fm.reset()  # no plan kept from another test of the same shape
    layer = make_layer(torch.float32, head_norm=head_norm, n_kv_heads=n_kv_heads)
    x = torch.randn(13, 48, requires_grad=True)
    dy = torch.randn(13, 48)
    fast_calls = []
    original = layer_op._fast_backward_call
    monkeypatch.setattr(layer_op, "_fast_backward_call", lambda *a: fast_calls.append(1) or original(*a))

    def grads():
        return torch.autograd.grad(layer(x), (x, *layer.parameters()), dy)

    first = grads()  # the checked path, which keeps the launchers
    assert not fast_calls and any(13 in per_t for per_t in layer_op._fast_backward.values())
    again = grads()
    assert len(fast_calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    with torch.no_grad():  # same signature, new values: the fast path must see them
        layer.router.add_(0.1)
        layer.k.mul_(1.5)
    changed = grads()
    assert len(fast_calls) == 2
    _, want = float64_layer_and_grads(layer, x, dy)
    for got, (name, ref) in zip(changed, want.items()):
        assert rel_error(got, ref) <= GRAD_TOL[torch.float32], name
    assert rel_error(first[0], want["x"]) > 1e-3


def test_backward_with_frozen_core_weights_takes_the_fast_path(monkeypatch):
    """Fine-tuning that trains the projections, the norm and the router but not K, U and V."""
    fm.reset()  # no plan kept from another test of the same shape
    layer = make_layer(torch.float32, head_norm=True)
    for w in (layer.k, layer.u, layer.v):
        w.requires_grad_(False)
    trained = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(9, 48, requires_grad=True)
    dy = torch.randn(9, 48)
    fast_calls = []
    original = layer_op._fast_backward_call
    monkeypatch.setattr(layer_op, "_fast_backward_call", lambda *a: fast_calls.append(a[-1]) or original(*a))

    def grads():
        return torch.autograd.grad(layer(x), (x, *trained), dy)

    first = grads()
    again = grads()
    assert fast_calls == [False]  # the second call, without dK/dU/dV
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    _, want = float64_layer_and_grads(layer, x, dy)
    names = ["x", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    for got, name in zip(again, names):
        assert rel_error(got, want[name]) <= GRAD_TOL[torch.float32], name
    for w in (layer.k, layer.u, layer.v):  # trained again: the plan learns the dK/dU/dV launcher
        w.requires_grad_(True)
    full = torch.autograd.grad(layer(x), (x, *layer.parameters()), dy)
    full_again = torch.autograd.grad(layer(x), (x, *layer.parameters()), dy)
    assert fast_calls == [False, True]
    assert all(torch.equal(a, b) for a, b in zip(full, full_again))


def test_direct_launches_need_the_tensors_on_the_current_device(monkeypatch):
    monkeypatch.setattr(op, "_gpu_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert op.launches_directly(2) and op.launches_directly(None)  # None: not a GPU
    assert not op.launches_directly(0)
    monkeypatch.setattr(op, "_gpu_count", lambda: 1)
    assert op.launches_directly(0)


def test_fast_paths_step_aside_for_tensors_off_the_current_device(monkeypatch):
    fm.reset()
    layer = make_layer(torch.float32, head_norm=True)
    x = torch.randn(7, 48, requires_grad=True)
    dy = torch.randn(7, 48)
    first = torch.autograd.grad(layer(x), (x, *layer.parameters()), dy)  # fills both fast paths
    assert any(7 in per_t for per_t in layer_op._fast_forward.values())
    assert any(7 in per_t for per_t in layer_op._fast_backward.values())

    def refuse(*args):
        raise AssertionError("a fast path ran for tensors off the current device")

    monkeypatch.setattr(op, "launches_directly", lambda device_index: False)
    monkeypatch.setattr(layer_op, "_fast_backward_call", refuse)
    for per_tokens in layer_op._fast_forward.values():
        for n_tokens, (*_launchers, direct) in list(per_tokens.items()):
            per_tokens[n_tokens] = (refuse, refuse, direct)
    again = torch.autograd.grad(layer(x), (x, *layer.parameters()), dy)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_head_parallel_dtensors_run_the_kernels_on_local_shards(tmp_path):
    """HeadParallel hands the layer op DTensors; on one rank (gloo) they must reach the generated
    kernels as local tensors and give the plain layer's output and gradients."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from flashmhf_runtime.parallel import HeadParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        layer = make_layer(torch.float32, head_norm=True)
        sharded = copy.deepcopy(layer)
        parallelize_module(sharded, init_device_mesh("cpu", (1,)), HeadParallel())
        x = torch.randn(9, 48)
        y, y_tp = layer(x), sharded(x)
        y.sum().backward()
        y_tp.sum().backward()
        assert torch.allclose(y_tp, y, rtol=1e-5, atol=1e-6)
        for (name, p), (_, p_tp) in zip(layer.named_parameters(), sharded.named_parameters()):
            g = p_tp.grad.full_tensor() if hasattr(p_tp.grad, "full_tensor") else p_tp.grad
            assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6), name
    finally:
        dist.destroy_process_group()



@pytest.mark.parametrize("d_model,n_heads,d_ff,n_experts", [(40, 2, 34, 2), (48, 2, 51, 3)],
                         ids=["dh20-de17", "dh24-de17"])
def test_odd_widths_run_and_match_float64(d_model, n_heads, d_ff, n_experts):
    """d_h = 20 (no norm/router kernel: PyTorch ops around the padded core) and d_h = 24 (the kernels
    with a masked head dim); d_e = 17 pads the core's sub-networks."""
    torch.manual_seed(0)
    layer = fm.FlashMHF(d_model, n_heads, d_ff, n_experts, head_norm=True)
    x = torch.randn(5, d_model, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    want, want_grads = float64_layer_and_grads(layer, x, dy)
    assert rel_error(y, want) <= 1e-4
    got = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    for name, g in got.items():
        assert rel_error(g, want_grads[name]) <= 1e-4, name
    dims = (n_heads, n_heads, d_model // n_heads, n_experts, d_ff // n_experts)
    assert (layer_op._shape_key(dims, torch.float32, INTERPRETER, ("norm_router", "norm_router_bwd")) is None) \
        == (d_model // n_heads == 20)


def test_norm_router_kinds_are_picked_per_architecture():
    """Before Hopper (mma.sync) no norm_router_bwd config of a 128-wide head compiles without spills
    (16-bit inputs): the layer's backward leaves the norm and router to PyTorch there; router_bwd and
    the forward kinds fit and run, and on Hopper every kind does."""
    dims, norm, plain = (16, 16, 128, 22, 256), ("norm_router", "norm_router_bwd"), ("router", "router_bwd")
    assert "would spill" in get_kind("norm_router_bwd").shape_reason(Spec("norm_router_bwd", *dims, "bf16"), SM80)
    layer_op._shape_key.cache_clear()  # its warning comes with the first answer
    with pytest.warns(UserWarning, match="no norm_router_bwd kernel .* on sm_80 .*PyTorch"):
        assert layer_op._shape_key(dims, torch.bfloat16, SM80, norm) is None
    for arch, kinds in ((SM80, norm[:1]), (SM80, plain), (SM90, norm), (SM90, plain)):
        assert layer_op._shape_key(dims, torch.bfloat16, arch, kinds) == (*dims, "bf16"), (arch.name, kinds)


def test_a_backward_kind_no_config_of_which_fits_leaves_the_norm_to_pytorch():
    """fp32 products are exact FMA loops: with E > 16 no norm_router_bwd or router_bwd config compiles
    without spills on any target, so the forward keeps its kernel, the backward runs the norm and
    router as PyTorch ops (said once), and every gradient stays right."""
    launched = []
    real_launch = layer_op._launch
    layer_op._shape_key.cache_clear()  # its warning comes with the first answer
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layer_op, "_launch", lambda key, *a: launched.append(key[0]) or real_launch(key, *a))
        for head_norm in (True, False):
            torch.manual_seed(0)
            layer = fm.FlashMHF(128, 1, 17 * 16, 17, head_norm=head_norm)
            x = torch.randn(3, 128, requires_grad=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y = layer(x)
                dy = torch.randn_like(y)
                y.backward(dy)
            kind = "norm_router_bwd" if head_norm else "router_bwd"
            said = [str(w.message) for w in caught if f"no {kind} kernel" in str(w.message)]
            assert len(said) == 1 and "would spill" in said[0], [str(w.message) for w in caught]
            want, want_grads = float64_layer_and_grads(layer, x, dy)
            assert rel_error(y, want) <= 1e-4
            for name, g in {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}.items():
                assert rel_error(g, want_grads[name]) <= 1e-4, name
    assert launched == ["norm_router_core", "router_core"], launched  # the forward's kernel (3 tokens: one)
