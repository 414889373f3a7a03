"""The architecture table and the kind registry: which kernel runs for (arch, shape, tokens), and
which defaults each architecture gets."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from flashmhf.cache.buckets import TUNED_BUCKETS
from flashmhf.codegen import KINDS, Spec, SpecError, get_kind, registry
from flashmhf.codegen.arch import (
    CHECKED_ARCHS,
    INTERPRETER,
    SM80,
    SM86,
    SM89,
    SM90,
    SM100,
    SM120,
    ArchWarning,
    arch_for_capability,
    with_device_limits,
)
from flashmhf.codegen.kinds import DKUV, DQ, FORWARD, KernelKind
from flashmhf.codegen.spec import kernel_dims
from flashmhf_runtime.presets import PRESETS

REPO_13B = (16, 16, 128, 22, 256)
BUCKETS = TUNED_BUCKETS


def _shape(*dims, dtype="bf16") -> Spec:
    return Spec("", *dims, dtype)


def _kinds(shape: Spec, tokens: int, arch) -> tuple:
    return tuple(registry.choose(role, shape, tokens, arch) for role in (FORWARD, DQ, DKUV))


# ---- the architecture table --------------------------------------------------------------------

def test_rows_hold_each_targets_limits():
    assert [a.name for a in CHECKED_ARCHS] == ["sm_80", "sm_86", "sm_89", "sm_90"]
    assert SM80.smem_per_block == 163 * 1024 and SM90.smem_per_block == 227 * 1024
    assert SM86.smem_per_block == SM89.smem_per_block == SM120.smem_per_block == 99 * 1024
    assert SM90.mma == 3 and {SM80.mma, SM86.mma, SM89.mma} == {2}
    assert not SM100.checked and not SM120.checked
    assert INTERPRETER.is_interpreter and INTERPRETER.capability is None
    assert SM90.capability_number == 90 and SM80.capability_number == 80


@pytest.mark.parametrize("capability", [(9, 0), "9.0", "sm_90", 90])
def test_capability_in_any_spelling_finds_its_row(capability):
    assert arch_for_capability(capability) is SM90


def test_unknown_gpu_gets_the_nearest_older_row_and_one_warning(monkeypatch):
    from flashmhf.codegen import arch

    monkeypatch.setattr(arch, "_warned", set())
    with pytest.warns(ArchWarning, match="8.7.*sm_86"):
        assert arch_for_capability((8, 7)) is SM86
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert arch_for_capability((8, 7)) is SM86  # said once
    with pytest.warns(ArchWarning):
        assert arch_for_capability((10, 3)) is SM100
    with pytest.warns(ArchWarning):
        assert arch_for_capability((7, 5)) is SM80  # older than every row: the oldest
    assert arch_for_capability(None) is INTERPRETER
    with pytest.raises(ValueError, match="capability"):
        arch_for_capability("ninety")


def test_numbers_the_device_reports_replace_the_rows():
    h100_pcie = with_device_limits(SM90, sm_count=114, smem_per_block=None, regs_per_sm=0)
    assert h100_pcie.sm_count == 114 and h100_pcie.smem_per_block == SM90.smem_per_block
    assert h100_pcie.regs_per_sm == SM90.regs_per_sm and h100_pcie.features == SM90.features


# ---- the registry --------------------------------------------------------------------------------

def test_every_role_the_runtime_runs_ends_in_a_kind_that_needs_nothing():
    assert [r.name for r in registry.runtime_roles()] == ["forward", "dq", "dkuv", "norm_router", "router",
                                                          "norm_router_bwd", "router_bwd", "norm_router_core",
                                                          "router_core"]
    for role in registry.roles():
        chain = registry.kinds_of(role)
        assert chain, role
        last = chain[-1]
        assert not last.needs and last.min_tokens == 1 and last.fallback is None, last.name
        for kind in chain[:-1]:
            assert kind.fallback and get_kind(kind.fallback).role == role, kind.name
    assert {k.name for r in registry.roles() for k in registry.kinds_of(r)} == set(KINDS)


def test_tune_defaults_to_the_kinds_the_runtime_runs():
    assert registry.default_kinds() == ["fwd_ws", "fwd_ws_split", "fwd", "bwd_dq_ws", "bwd_dq", "bwd_dkuv_ws",
                                        "bwd_dkuv",
                                        "norm_router", "router", "norm_router_bwd", "router_bwd",
                                        "norm_router_core", "router_core"]


@pytest.mark.parametrize("arch, tokens, expected", [
    (SM90, 1, ("fwd", "bwd_dq", "bwd_dkuv_ws")),
    (SM90, 255, ("fwd", "bwd_dq", "bwd_dkuv_ws")),
    (SM90, 256, ("fwd_ws_split", "bwd_dq", "bwd_dkuv_ws")),  # d_ff split over programs: 256-4096 tokens
    (SM90, 1023, ("fwd_ws_split", "bwd_dq", "bwd_dkuv_ws")),
    (SM90, 1024, ("fwd_ws", "bwd_dq_ws", "bwd_dkuv_ws")),
    (SM90, 16384, ("fwd_ws", "bwd_dq_ws", "bwd_dkuv_ws")),
    (SM80, 16384, ("fwd", "bwd_dq", "bwd_dkuv")),
    (SM86, 16384, ("fwd", "bwd_dq", "bwd_dkuv")),
    (SM89, 1, ("fwd", "bwd_dq", "bwd_dkuv")),
    (SM100, 16384, ("fwd", "bwd_dq", "bwd_dkuv")),  # no wgmma on Blackwell
    (SM120, 16384, ("fwd", "bwd_dq", "bwd_dkuv")),
    (INTERPRETER, 16384, ("fwd", "bwd_dq", "bwd_dkuv")),
])
def test_choice_per_arch_and_tokens(arch, tokens, expected):
    assert _kinds(_shape(*REPO_13B), tokens, arch) == expected


@pytest.mark.parametrize("dims, dtype, expected", [
    (REPO_13B, "fp32", ("fwd", "bwd_dq", "bwd_dkuv")),  # the Gluon kernels take 16-bit inputs
    ((8, 8, 96, 8, 256), "bf16", ("fwd_ws", "bwd_dq_ws", "bwd_dkuv_ws")),  # d_h 96: in 64 + 32 column parts
    ((8, 8, 48, 8, 256), "bf16", ("fwd", "bwd_dq", "bwd_dkuv")),  # d_h 48: no power of two, not 96
    ((8, 2, 64, 4, 384), "fp16", ("fwd_ws", "bwd_dq_ws", "bwd_dkuv_ws")),  # H_kv < H, d_e 384
    ((4, 4, 64, 3, 96), "bf16", ("fwd", "bwd_dq", "bwd_dkuv")),  # d_e not a multiple of 64
    ((4, 4, 24, 2, 32), "bf16", ("fwd", "bwd_dq", "bwd_dkuv")),  # d_h 24 (masked)
    ((4, 4, 264, 2, 64), "bf16", (None, None, None)),  # wider than a tile: the reference
])
def test_choice_per_shape_on_hopper(dims, dtype, expected):
    assert _kinds(_shape(*dims, dtype=dtype), 4096, SM90) == expected


def test_disabled_kinds_fall_back_and_the_reason_names_the_limit():
    shape = _shape(*REPO_13B)
    assert registry.choose(FORWARD, shape, 4096, SM90, disabled={"fwd_ws"}) == "fwd_ws_split"
    assert registry.choose(FORWARD, shape, 4097, SM90, disabled={"fwd_ws"}) == "fwd"  # above its 4096
    assert registry.choose(FORWARD, shape, 4096, SM90, disabled={"fwd_ws", "fwd_ws_split", "fwd"}) is None
    assert "at most 256" in registry.reason(FORWARD, _shape(4, 4, 264, 2, 64), SM90)


def test_a_new_kind_is_its_module_and_one_registry_line(monkeypatch):
    # A kind of an existing role, needing an instruction only some targets have, falling back to fwd.
    fwd = get_kind("fwd")
    fancy = dataclasses.replace(fwd, name="fwd_fancy", needs=frozenset({"wgmma"}), min_tokens=64, fallback="fwd")
    monkeypatch.setitem(KINDS, "fwd_fancy", fancy)
    registry.runnable.cache_clear()
    try:
        shape = _shape(*REPO_13B)
        assert [k.name for k in registry.kinds_of(FORWARD)] == ["fwd_ws", "fwd_ws_split", "fwd_fancy", "fwd"]
        assert registry.choose(FORWARD, shape, 64, SM90, disabled={"fwd_ws"}) == "fwd_fancy"
        assert registry.choose(FORWARD, shape, 63, SM90, disabled={"fwd_ws"}) == "fwd"
        assert registry.choose(FORWARD, shape, 64, SM80) == "fwd"
        assert "fwd_fancy" in registry.default_kinds()
        from flashmhf.tuner.harness import make_problem  # the role's harness serves it

        problem = make_problem(Spec("fwd_fancy", 2, 2, 32, 2, 32, "fp32"), 4, "cpu", seed=0)
        assert problem.tolerance == 1e-4
    finally:
        registry.runnable.cache_clear()


def test_gradient_roles_are_checked_at_the_training_tolerance():
    from flashmhf.tuner.harness import make_problem

    for kind, tol in (("fwd", 1e-2), ("bwd_dq", 2e-2), ("bwd_dkuv", 2e-2), ("bwd_fused", 2e-2)):
        assert make_problem(Spec(kind, 2, 2, 32, 2, 32, "bf16"), 4, "cpu", seed=0).tolerance == tol


# ---- defaults per architecture -------------------------------------------------------------------

def _preset_specs(kind: str, dtype: str = "bf16"):
    for p in PRESETS.values():
        d_h, d_e = kernel_dims(p.head_dim, p.expert_dim)
        yield Spec(kind, p.n_heads, p.kv_heads, d_h, p.n_experts, d_e, dtype)


@pytest.mark.parametrize("arch", [*CHECKED_ARCHS, SM100, SM120], ids=lambda a: a.name)
def test_every_default_passes_its_archs_checks(arch):
    for kind in KINDS.values():
        if kind.unavailable(arch):
            continue
        for dtype in ("bf16", "fp32"):
            for spec in _preset_specs(kind.name, dtype):
                if kind.shape_reason(spec, arch):
                    continue
                for tokens in BUCKETS:
                    config = kind.default(spec, tokens, arch)
                    assert kind.reject(spec, config, None if kind.token_reason(tokens) else tokens, arch) is None, \
                        (arch.name, spec.label(), tokens, config)
                    if "tma" in config:
                        assert not config["tma"] or "tma" in arch.features


def test_pre_hopper_defaults_are_smaller_than_hoppers():
    spec = Spec("bwd_dq", *REPO_13B, "bf16")
    hopper, ampere = (get_kind("bwd_dq").default(spec, 16384, a) for a in (SM90, SM80))
    assert hopper == dict(block_m=128, block_f=64, num_warps=8, num_stages=3)
    assert ampere["block_m"] * ampere["block_f"] < hopper["block_m"] * hopper["block_f"]
    assert get_kind("fwd").default(Spec("fwd", *REPO_13B, "bf16"), 16384, SM80)["tma"] == 0  # no TMA before Hopper


def test_no_default_that_fits_is_a_spec_error_never_an_assertion():
    tiny = dataclasses.replace(SM80, name="sm_tiny", smem_per_block=1024)
    spec = Spec("fwd", *REPO_13B, "bf16")
    with pytest.raises(SpecError, match="no fwd config fits.*sm_tiny.*shared memory"):
        get_kind("fwd").default(spec, 16, tiny)
    assert registry.choose(FORWARD, _shape(*REPO_13B), 16, tiny) is None


def test_kind_fields_are_declared_in_its_module():
    for kind in KINDS.values():
        assert isinstance(kind, KernelKind)
        # Its module is named after the kind, or after the family it shares a template with (the
        # layer's norm/router kinds live in ``norm_router``).
        module = kind.reject_fn.__module__
        assert module == kind.default_fn.__module__
        assert module.rsplit(".", 1)[1] in (kind.name, kind.template.split(".")[0].removesuffix("_bwd"))
