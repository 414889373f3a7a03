"""The FlashMHF layer, the authors' checkpoint layout, and a tiny LM built from the layer.

The core runs under Triton's interpreter here (conftest sets TRITON_INTERPRET=1): shapes are tiny.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flashmhf_runtime as fm
from flashmhf_runtime import reference
from flashmhf_runtime.checkpoint import load_authors_state_dict, to_authors_state_dict
from tests.helpers import rel_error

# d_model 32 = 2 heads of 16; d_ff 48 = 3 sub-networks of 16.
SMALL = dict(d_model=32, n_heads=2, d_ff=48, n_experts=3)
REPO = Path(__file__).resolve().parents[1]


def make_layer(seed: int = 0, **kw) -> fm.FlashMHF:
    torch.manual_seed(seed)
    layer = fm.FlashMHF(**{**SMALL, **kw})
    with torch.no_grad():  # trained-looking norm weights so a dropped norm would show
        if layer.head_norm is not None:
            layer.head_norm.weight.uniform_(0.5, 1.5)
    return layer


def reference_layer(layer: fm.FlashMHF, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None):
    p = params if params is not None else {n: t.detach().double() for n, t in layer.named_parameters()}
    return reference.layer(
        x, p["w_in.weight"], p["w_out.weight"], p["k"], p["u"], p["v"], p["router"], p.get("head_norm.weight")
    )


def needs_core_autograd():
    """Skip-free guard: a clear failure message while the core op has no autograd formula."""
    q = torch.zeros(1, 1, 16, requires_grad=True)
    w = torch.zeros(1, 1, 16, 16)
    try:
        fm.flash_mhf(q, w, w, w, torch.ones(1, 1, 1)).sum().backward()
    except RuntimeError as exc:
        if "autograd" in str(exc):
            pytest.fail("fm.flash_mhf has no autograd formula yet (flashmhf::core backward not registered)")
        raise


# ------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("n_kv_heads", [None, 1], ids=["kv=H", "kv=1"])
@pytest.mark.parametrize("head_norm", [False, True], ids=["nonorm", "headnorm"])
def test_forward_matches_reference(head_norm, n_kv_heads):
    layer = make_layer(head_norm=head_norm, n_kv_heads=n_kv_heads)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert rel_error(y, reference_layer(layer, x.double())) <= 1e-4


def test_forward_bf16_params_and_autocast():
    x = torch.randn(7, 32)
    layer = make_layer(head_norm=True)
    ref = reference_layer(layer, x.double())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y_amp = layer(x)
        r = layer.route(layer.w_in(x).unflatten(-1, (2, 16)))
    assert y_amp.dtype == torch.bfloat16 and r.dtype == torch.float32
    assert rel_error(y_amp, ref) <= 2e-2
    with torch.no_grad():
        y_bf16 = layer.to(torch.bfloat16)(x.bfloat16())
    assert y_bf16.dtype == torch.bfloat16
    assert rel_error(y_bf16, ref) <= 2e-2


def test_forward_calls_core_and_core_fn_swaps_it():
    layer = make_layer()
    calls = []

    def core(*args):
        calls.append([tuple(a.shape) for a in args])
        return reference.flash_mhf(*args)

    layer.core_fn = core
    x = torch.randn(3, 32)
    with torch.no_grad():
        y = layer(x)
    assert calls == [[(3, 2, 16), (2, 3, 16, 16), (2, 3, 16, 16), (2, 3, 16, 16), (3, 2, 3)]]
    assert rel_error(y, reference_layer(layer, x.double())) <= 1e-5


def test_forward_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 32\)"):
        make_layer()(torch.randn(3, 31))


# ----------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("n_kv_heads,head_norm", [(None, True), (1, False)], ids=["kv=H-norm", "kv=1"])
def test_backward_matches_reference(n_kv_heads, head_norm):
    needs_core_autograd()
    layer = make_layer(head_norm=head_norm, n_kv_heads=n_kv_heads)
    x = torch.randn(2, 3, 32, requires_grad=True)
    g = torch.randn(2, 3, 32)
    (layer(x) * g).sum().backward()

    params = {n: t.detach().double().requires_grad_() for n, t in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    (reference_layer(layer, x64, params) * g.double()).sum().backward()
    assert rel_error(x.grad, x64.grad) <= 1e-4
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert rel_error(p.grad, params[name].grad) <= 1e-4, name


# ------------------------------------------------------------------------------------- init


def test_init_statistics():
    torch.manual_seed(0)
    layer = fm.FlashMHF(512, 8, 1024, 16, head_norm=True)
    bound = 0.707 * math.sqrt(6 / (512 + 512))  # xavier-uniform with gain 0.707
    for lin in (layer.w_in, layer.w_out):
        w = lin.weight
        assert lin.bias is None
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.02
    for w in (layer.k, layer.u, layer.v):
        assert abs(w.std().item() / 0.02 - 1) < 0.02 and abs(w.mean().item()) < 1e-3
    # Router: torch's trunc_normal_ with its default bounds (±2 absolute) as in the authors' code,
    # so the std is that of the untruncated normal (a ±2σ truncation would give 0.0176).
    r = layer.router
    assert r.abs().max() <= 2.0
    assert abs(r.std().item() / 0.02 - 1) < 0.04
    assert torch.equal(layer.head_norm.weight, torch.ones(8, 64))
    # Deterministic given the seed; reset_parameters redraws.
    torch.manual_seed(0)
    again = fm.FlashMHF(512, 8, 1024, 16, head_norm=True)
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), again.parameters()))


def test_dtype_and_device_factory_kwargs():
    layer = fm.FlashMHF(**SMALL, head_norm=True, dtype=torch.bfloat16)
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    assert 0.01 < layer.router.float().std().item() < 0.03


# ----------------------------------------------------------------------------------- bad args


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(d_model=33), r"n_heads: expected a divisor of d_model=33, got 2"),
        (dict(d_ff=50), r"n_experts: expected a divisor of d_ff=50, got 3"),
        (dict(n_kv_heads=3, n_heads=4), r"n_kv_heads: expected a divisor of n_heads=4, got 3"),
        (dict(d_model=0), r"d_model: expected a positive int, got 0"),
        (dict(n_heads=-2), r"n_heads: expected a positive int, got -2"),
        (dict(d_ff=48.0), r"d_ff: expected a positive int, got 48.0"),
        (dict(n_experts=True), r"n_experts: expected a positive int, got True"),
        (dict(n_kv_heads=0), r"n_kv_heads: expected a positive int, got 0"),
        (dict(head_norm="yes"), r"head_norm: expected a bool, got 'yes'"),
    ],
)
def test_bad_args(kw, match):
    with pytest.raises(ValueError, match=match):
        fm.FlashMHF(**{**SMALL, **kw})


# ------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("name", list(fm.PRESETS))
def test_from_preset_on_meta(name):
    p = fm.PRESETS[name]
    layer = fm.FlashMHF.from_preset(name, device="meta")
    assert layer.router.is_meta
    shapes = {n: tuple(t.shape) for n, t in layer.named_parameters()}
    expected = {
        "w_in.weight": (p.d_model, p.d_model),
        "w_out.weight": (p.d_model, p.d_model),
        **{w: (p.kv_heads, p.n_experts, p.expert_dim, p.head_dim) for w in "kuv"},
        "router": (p.n_heads, p.head_dim, p.n_experts),
    }
    if p.head_norm:
        expected["head_norm.weight"] = (p.n_heads, p.head_dim)
    assert shapes == expected
    assert f"head_norm={p.head_norm}" in repr(layer)
    off = fm.FlashMHF.from_preset(name, device="meta", head_norm=False, n_kv_heads=2)
    assert off.head_norm is None and off.k.shape[0] == 2


def test_from_preset_unknown():
    with pytest.raises(ValueError, match="unknown preset 'nope'; expected one of paper-128m"):
        fm.FlashMHF.from_preset("nope")


def test_extra_repr():
    text = fm.FlashMHF(**SMALL, n_kv_heads=1, head_norm=True, device="meta").extra_repr()
    assert text == (
        "d_model=32, n_heads=2, head_dim=16, d_ff=48, n_experts=3, expert_dim=16, n_kv_heads=1, head_norm=True"
    )


# --------------------------------------------------------------------------------- checkpoint


def authors_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, n_heads: int, n_experts: int, apply_norm: bool):
    """The authors' formulation written directly on their tensors, one head and sub-network at a time."""
    d_model = x.shape[-1]
    d_h, d_ff = d_model // n_heads, sd["gate_weight"].shape[0]
    d_e = d_ff // n_experts
    q_all = x @ sd["w_self.weight"].T
    heads = []
    for h in range(n_heads):
        cols = slice(h * d_h, (h + 1) * d_h)
        q = q_all[..., cols]
        if apply_norm:
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-5) * sd["q_norm.weight"][h]
        r = torch.sigmoid(q @ sd["router"][h])
        r = r / r.sum(-1, keepdim=True)
        gate, up, down = (sd[k][:, cols] for k in ("gate_weight", "up_weight", "down_weight"))
        s = torch.zeros_like(q)
        for e in range(n_experts):
            rows = slice(e * d_e, (e + 1) * d_e)
            a = F.silu(q @ gate[rows].T) * (q @ up[rows].T)
            s = s + r[..., e : e + 1] * (a @ down[rows])
        heads.append(s)
    return torch.cat(heads, -1) @ sd["w_self_2.weight"].T


def random_authors_state_dict(seed: int, prefix: str = "", n_kv: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        prefix + "w_self.weight": torch.randn(32, 32, generator=g) / 32**0.5,
        prefix + "w_self_2.weight": torch.randn(32, 32, generator=g) / 32**0.5,
        **{
            prefix + k: torch.randn(48, n_kv * 16, generator=g) / 4 for k in ("gate_weight", "up_weight", "down_weight")
        },
        prefix + "router": torch.randn(2, 16, 3, generator=g),
        prefix + "q_norm.weight": torch.rand(2, 16, generator=g) + 0.5,
    }


@pytest.mark.parametrize("head_norm", [False, True], ids=["nonorm", "headnorm"])
def test_checkpoint_mapping_matches_authors_formulation(head_norm):
    sd = random_authors_state_dict(1, prefix="model.layers.3.mlp.")
    if not head_norm:
        sd["model.layers.3.mlp.q_norm.weight"] = torch.ones(2, 16)
    sd["model.layers.4.mlp.router"] = torch.zeros(1)  # another layer's key: not ours, ignored
    layer = fm.FlashMHF(**SMALL, head_norm=head_norm)
    load_authors_state_dict(layer, sd, prefix="model.layers.3.mlp.")
    x = torch.randn(4, 32)
    theirs = {k.removeprefix("model.layers.3.mlp."): t.double() for k, t in sd.items() if ".3." in k}
    expected = authors_forward(theirs, x.double(), 2, 3, head_norm)
    with torch.no_grad():
        assert rel_error(layer(x), expected) <= 1e-4
    # The reference routes in fp32 by design, hence not 1e-12.
    assert rel_error(reference_layer(layer, x.double()), expected) <= 1e-6


@pytest.mark.parametrize("n_kv_heads,head_norm", [(None, True), (None, False), (1, True)])
def test_checkpoint_round_trip(n_kv_heads, head_norm):
    layer = make_layer(seed=3, n_kv_heads=n_kv_heads, head_norm=head_norm)
    sd = to_authors_state_dict(layer, prefix="mlp.")
    n_kv = n_kv_heads or 2
    assert {k: tuple(t.shape) for k, t in sd.items()} == {
        "mlp.w_self.weight": (32, 32),
        "mlp.w_self_2.weight": (32, 32),
        "mlp.gate_weight": (48, n_kv * 16),
        "mlp.up_weight": (48, n_kv * 16),
        "mlp.down_weight": (48, n_kv * 16),
        "mlp.router": (2, 16, 3),
        "mlp.q_norm.weight": (2, 16),
    }
    assert all(t.is_contiguous() for t in sd.values())
    # The mapping itself: row e·d_e + j, column g·d_h + i holds k[g, e, j, i].
    assert sd["mlp.gate_weight"][2 * 16 + 5, (n_kv - 1) * 16 + 7] == layer.k[n_kv - 1, 2, 5, 7]
    other = make_layer(seed=4, n_kv_heads=n_kv_heads, head_norm=head_norm)
    load_authors_state_dict(other, sd, prefix="mlp.")
    for (name, a), b in zip(layer.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name
    again = to_authors_state_dict(other, prefix="mlp.")
    assert all(torch.equal(sd[k], again[k]) for k in sd)


def test_checkpoint_converts_dtype_and_shared_norm_weight():
    sd = random_authors_state_dict(2)
    sd = {k: t.bfloat16() for k, t in sd.items()}
    sd["q_norm.weight"] = torch.linspace(0.5, 1.5, 16)  # one (d_h,) weight shared by all heads
    layer = fm.FlashMHF(**SMALL, head_norm=True)
    load_authors_state_dict(layer, sd)
    assert layer.k.dtype == torch.float32
    assert torch.equal(layer.head_norm.weight, sd["q_norm.weight"].expand(2, 16))
    assert torch.equal(layer.w_in.weight, sd["w_self.weight"].float())


def test_checkpoint_errors_leave_layer_unchanged():
    layer = make_layer(head_norm=True)
    before = [p.clone() for p in layer.parameters()]
    good = random_authors_state_dict(5)

    missing = {k: t for k, t in good.items() if k != "up_weight"}
    with pytest.raises(ValueError, match=r"missing keys \['up_weight'\]"):
        load_authors_state_dict(layer, missing)
    no_norm = {k: t for k, t in good.items() if k != "q_norm.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['q_norm.weight'\]"):
        load_authors_state_dict(layer, no_norm)
    with pytest.raises(ValueError, match=r"unexpected keys \['w_self.bias'\]"):
        load_authors_state_dict(layer, {**good, "w_self.bias": torch.zeros(32)})
    with pytest.raises(ValueError, match=r"state_dict\['gate_weight'\]: expected shape \(48, 32\) .*got \(32, 48\)"):
        load_authors_state_dict(layer, {**good, "gate_weight": good["gate_weight"].T})
    with pytest.raises(ValueError, match=r"state_dict\['router'\]: expected shape \(2, 16, 3\)"):
        load_authors_state_dict(layer, {**good, "router": torch.zeros(2, 16, 4)})
    with pytest.raises(ValueError, match=r"q_norm.weight'\]: expected shape \(2, 16\) or \(16,\), got \(32,\)"):
        load_authors_state_dict(layer, {**good, "q_norm.weight": torch.ones(32)})
    with pytest.raises(ValueError, match=r"missing keys \['m.w_self.weight'"):
        load_authors_state_dict(layer, good, prefix="m.")
    with pytest.raises(ValueError, match="layer: expected a FlashMHF, got Linear"):
        load_authors_state_dict(torch.nn.Linear(2, 2), good)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


def test_checkpoint_norm_weight_without_head_norm():
    layer = make_layer(head_norm=False)
    sd = random_authors_state_dict(6)
    with pytest.raises(ValueError, match="expected all ones for a layer built without head_norm"):
        load_authors_state_dict(layer, sd)
    load_authors_state_dict(layer, {**sd, "q_norm.weight": torch.ones(2, 16)})  # never trained: fine
    load_authors_state_dict(layer, {k: t for k, t in sd.items() if k != "q_norm.weight"})  # absent: fine
    assert torch.equal(to_authors_state_dict(layer)["q_norm.weight"], torch.ones(2, 16))


# ------------------------------------------------------------------------------ torch.compile


# What CPU users without TRITON_INTERPRET get: the reference inside the custom op.
CORE_PATHS = ["interpreter", "cpu-reference"]


def use_core_path(core_path: str, monkeypatch) -> None:
    if core_path == "cpu-reference":
        from flashmhf_runtime import op

        monkeypatch.setattr(op, "_INTERPRET", False)


@pytest.mark.parametrize("core_path", CORE_PATHS)
def test_compile_fullgraph_forward_matches_eager(core_path, monkeypatch):
    use_core_path(core_path, monkeypatch)
    torch._dynamo.reset()
    layer = make_layer(head_norm=True)
    x = torch.randn(2, 3, 32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("core_path", CORE_PATHS)
def test_compile_fullgraph_backward_matches_eager(core_path, monkeypatch):
    needs_core_autograd()
    use_core_path(core_path, monkeypatch)
    torch._dynamo.reset()
    layer = make_layer(head_norm=True, n_kv_heads=1)
    x = torch.randn(2, 3, 32, requires_grad=True)
    layer(x).square().sum().backward()
    eager = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    got = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, eager):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ tiny LM


def tiny_lm():
    spec = importlib.util.spec_from_file_location("train_tiny_lm", REPO / "examples" / "train_tiny_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


TINY_ARGS = [
    "--device", "cpu", "--dtype", "fp32", "--layers", "2", "--d-model", "32", "--heads", "2",
    "--d-ff", "32", "--experts", "2", "--batch", "2", "--seq", "16", "--log-every", "1",
    "--max-bytes", "200000", "--quiet",
]  # fmt: skip


def test_tiny_lm_runs_with_the_core_op(tmp_path):
    needs_core_autograd()
    out = tmp_path / "losses.json"
    result = tiny_lm().main([*TINY_ARGS, "--steps", "3", "--json", str(out)])
    losses = [loss for _, loss in result["losses"]]
    assert [s for s, _ in result["losses"]] == [0, 1, 2]
    assert all(math.isfinite(v) for v in losses) and abs(losses[0] - math.log(256)) < 0.3
    assert out.exists() and "losses" in out.read_text()


def test_tiny_lm_learns_and_is_deterministic():
    lm = tiny_lm()
    args = [*TINY_ARGS, "--steps", "12", "--reference", "--lr", "1e-2", "--warmup", "0", "--seed", "3"]
    first = lm.main(args)
    losses = [loss for _, loss in first["losses"]]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert lm.main(args)["losses"] == first["losses"]
