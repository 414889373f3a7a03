"""The op's direct launch path (flashmhf_runtime/direct_launch.py): argument assembly and fallbacks
against fake compiled kernels on CPU; the same output as Triton's JIT path on a GPU."""

from __future__ import annotations

import inspect
import math
import types

import pytest
import torch
import triton

import flashmhf_runtime as fm
from flashmhf.codegen import Spec, load
from flashmhf_runtime import direct_launch, op, scratch
from flashmhf_runtime.direct_launch import DirectLauncher, argument_values
from tests.helpers import POISON, TOLERANCE, core_inputs, misaligned, reference_core, rel_error

SHAPE = (5, 2, 2, 64, 2, 32)  # tokens, H, H_kv, d_h, E, d_e
SPEC = Spec("fwd", *SHAPE[1:], "fp32")
SPLIT_CONFIG = dict(block_m=16, block_f=16, num_warps=4, num_stages=1, split=2, tma=0)
STREAM = 0xABC


class FakeCompiled:
    """Stands in for Triton's CompiledKernel: records what its launcher is called with."""

    def __init__(self, name: str):
        self.function = f"function-{name}"
        self.packed_metadata = (4, 1, 1024)
        self.calls: list[tuple] = []

    def run(self, *args):
        self.calls.append(args)


class FakeKernel:
    """Stands in for a @triton.jit function with ``real``'s parameters: records JIT launches."""

    def __init__(self, real):
        self.arg_names = list(real.arg_names)
        self.signature = inspect.signature(real.fn)
        self.compiled = FakeCompiled(real.fn.__name__)
        self.jit_calls: list[tuple] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            return self.compiled

        return launch


def _fake_launcher(monkeypatch, config=SPLIT_CONFIG, tokens=SHAPE[0], spec=SPEC, *plan_args):
    """A DirectLauncher of the real plan of ``spec``, its kernels replaced by fakes."""
    monkeypatch.setattr(direct_launch, "_stream_getter", lambda: lambda device_index: STREAM)
    monkeypatch.setattr(scratch, "_workspace", {})
    monkeypatch.setattr(scratch, "_counters", {})
    mod = load(spec)
    plan = mod.contiguous_plan(tokens, *plan_args, **config)
    fakes = [FakeKernel(step.kernel) for step in plan.steps]
    plan = plan._replace(steps=tuple(step._replace(kernel=f) for step, f in zip(plan.steps, fakes)))
    module = types.SimpleNamespace(
        __name__="fake", SLOTS=mod.SLOTS, WORKSPACE_SLOT=mod.WORKSPACE_SLOT, WORKSPACE_DTYPE=mod.WORKSPACE_DTYPE,
        COUNTERS_SLOT=getattr(mod, "COUNTERS_SLOT", None), run_plan=mod.run_plan,
    )
    return DirectLauncher(module, plan, 0), plan, fakes


def _tensors(seed: int):
    q, k, u, v, r = core_inputs(*SHAPE, torch.float32, seed=seed)
    return q, k, u, v, r, torch.empty_like(q)


def test_argument_values_parameter_order():
    def kernel(a_ptr, b_ptr, n, stride, BLOCK, FLAG=3):
        pass

    fake = types.SimpleNamespace(arg_names=["a_ptr", "b_ptr", "n", "stride", "BLOCK", "FLAG"],
                                 signature=inspect.signature(kernel))
    # kwargs in any order; launch options (num_warps) are not parameters; FLAG takes its default.
    assert argument_values(fake, ("a", "b", 7), dict(num_warps=4, BLOCK=64, stride=2)) == ("a", "b", 7, 2, 64, 3)
    assert argument_values(fake, ("a", "b", 7, 2), dict(FLAG=1, BLOCK=64)) == ("a", "b", 7, 2, 64, 1)
    with pytest.raises(ValueError, match="no value for parameter 'BLOCK'"):
        argument_values(fake, ("a", "b", 7, 2), {})
    with pytest.raises(ValueError, match="given twice"):
        argument_values(fake, ("a", "b", 7, 2), dict(n=3, BLOCK=1))
    with pytest.raises(ValueError, match="7 positional arguments for 6"):
        argument_values(fake, tuple(range(7)), {})


@pytest.mark.parametrize("split", [1, 2])
def test_direct_path_substitutes_tensors_in_parameter_order(monkeypatch, split):
    launcher, plan, fakes = _fake_launcher(monkeypatch, dict(SPLIT_CONFIG, split=split))
    first = _tensors(1)
    launcher(*first)  # through the JIT, which sets the direct path up
    assert launcher.direct is not None and not launcher.gave_up
    assert [len(f.jit_calls) for f in fakes] == [1] * len(fakes)
    assert all(not f.compiled.calls for f in fakes)

    q, k, u, v, r, out = tensors = _tensors(2)
    launcher(*tensors)
    assert [len(f.jit_calls) for f in fakes] == [1] * len(fakes)  # no second JIT launch
    named = dict(q=q, k=k, u=u, v=v, r=r, out=out)
    workspaces = set()
    for step, fake in zip(plan.steps, fakes):
        (call,) = fake.compiled.calls
        grid, head, values = call[:3], call[3:9], call[9:]
        assert grid == (*step.grid, 1, 1)[:3]
        assert head == (STREAM, fake.compiled.function, fake.compiled.packed_metadata, None, None, None)
        expected = argument_values(step.kernel, step.args, step.kwargs)  # slot names, parameter order
        assert len(values) == len(fake.arg_names) == len(expected)
        for name, want, got in zip(fake.arg_names, expected, values):
            if want == "ws":
                assert got.numel() >= math.prod(plan.workspace) and got.dtype == torch.float32, name
                workspaces.add(got.data_ptr())
            elif isinstance(want, str):
                assert got is named[want], name
            else:
                assert got == want and not isinstance(got, torch.Tensor), name
    assert len(workspaces) == (split > 1)  # one workspace, shared by both steps

    # The values the JIT path got, with its tensors: the forward's first six parameters are pointers.
    grid, args, kwargs = fakes[0].jit_calls[0]
    assert args[:5] == first[:5] and grid == plan.steps[0].grid
    assert kwargs["SPLIT"] == split and kwargs["num_warps"] == SPLIT_CONFIG["num_warps"]


def test_workspace_is_the_streams_scratch_and_fresh_under_graph_capture(monkeypatch):
    """Launches on one stream run in order, so every plan there shares one scratch buffer (grown to
    the largest workspace asked for); another stream has its own; a CUDA graph being captured gets
    fresh memory per call (its own pool), never the eager buffer."""
    launcher, plan, fakes = _fake_launcher(monkeypatch)
    bigger, _, bigger_fakes = _fake_launcher(monkeypatch, tokens=3 * SHAPE[0])
    scratch.clear()
    for seed in (1, 2, 3):
        launcher(*_tensors(seed))
    calls = fakes[1].compiled.calls  # the reduce: (grid, 6 launch args, ws, out, n_elems, ...)
    assert len(calls) == 2 and calls[0][9] is calls[1][9]
    q, k, u, v, r, out = _tensors(4)
    grown = [torch.empty(3 * q.shape[0], *q.shape[1:]) for _ in range(2)]
    bigger(grown[0], k, u, v, torch.cat([r] * 3), grown[1])  # JIT: its own workspace
    bigger(grown[0], k, u, v, torch.cat([r] * 3), grown[1])
    big_ws = bigger_fakes[1].compiled.calls[0][9]
    assert big_ws.numel() >= math.prod(bigger.plan.workspace) and big_ws is not calls[0][9]
    launcher(q, k, u, v, r, out)  # the grown buffer serves the smaller plan too
    assert fakes[1].compiled.calls[-1][9] is big_ws
    launcher._stream = lambda device_index: STREAM + 1  # as set up from Triton's stream query
    launcher(q, k, u, v, r, out)
    assert fakes[1].compiled.calls[-1][9] is not big_ws  # another stream, another buffer
    monkeypatch.setattr(scratch, "capturing", lambda: True)
    launcher(q, k, u, v, r, out)
    launcher(q, k, u, v, r, out)
    captured = [c[9] for c in fakes[1].compiled.calls[-2:]]
    assert captured[0] is not captured[1] and all(w is not big_ws for w in captured)


def test_counters_are_zeroed_once_per_stream_and_fresh_under_graph_capture(monkeypatch):
    spec = Spec("norm_router_core", 2, 2, 64, 2, 32, "fp32")
    config = dict(block_m=16, block_f=16, num_warps=4, num_stages=1, split=2)
    launcher, plan, fakes = _fake_launcher(monkeypatch, config, 5, spec, 1e-5)
    assert plan.counters == 2 and launcher.n_counters == 2  # one row tile of each of the 2 kv heads
    q = torch.randn(5, 2, 64)
    norm_w, w_r = torch.ones(2, 64), torch.randn(2, 64, 2)
    k, u, v = (torch.randn(2, 2, 32, 64) for _ in range(3))
    tensors = (q, norm_w, w_r, k, u, v, torch.empty_like(q))
    for _ in range(3):
        launcher(*tensors)
    names = fakes[0].arg_names
    calls = [dict(zip(names, c[9:])) for c in fakes[0].compiled.calls]
    assert len(calls) == 2 and calls[0]["count_ptr"] is calls[1]["count_ptr"]
    assert calls[0]["count_ptr"].dtype == torch.int32 and not calls[0]["count_ptr"].any()
    monkeypatch.setattr(scratch, "capturing", lambda: True)
    launcher(*tensors)
    captured = dict(zip(names, fakes[0].compiled.calls[-1][9:]))
    assert captured["count_ptr"] is not calls[0]["count_ptr"] and not captured["count_ptr"].any()


def test_misaligned_pointer_takes_the_jit_path(monkeypatch):
    launcher, plan, fakes = _fake_launcher(monkeypatch)
    launcher(*_tensors(1))
    q, k, u, v, r, out = _tensors(2)
    launcher(misaligned(q), k, u, v, r, out)
    launcher(q, k, misaligned(u), v, r, out)
    assert [len(f.jit_calls) for f in fakes] == [3, 3] and not fakes[0].compiled.calls
    launcher(q, k, u, v, r, out)
    assert [len(f.jit_calls) for f in fakes] == [3, 3] and len(fakes[0].compiled.calls) == 1


def test_misaligned_first_launch_sets_up_later(monkeypatch):
    launcher, plan, fakes = _fake_launcher(monkeypatch)
    q, k, u, v, r, out = _tensors(1)
    launcher(q, k, u, v, misaligned(r), out)
    assert launcher.direct is None and not launcher.gave_up  # compiled for a misaligned r: not reused
    launcher(q, k, u, v, r, out)
    assert launcher.direct is not None
    launcher(q, k, u, v, r, out)
    assert [len(f.jit_calls) for f in fakes] == [2, 2] and len(fakes[0].compiled.calls) == 1


def test_launch_hook_takes_the_jit_path(monkeypatch):
    launcher, plan, fakes = _fake_launcher(monkeypatch)
    launcher(*_tensors(1))
    hook = lambda metadata: None  # noqa: E731
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        launcher(*_tensors(2))
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert [len(f.jit_calls) for f in fakes] == [2, 2] and not fakes[0].compiled.calls
    monkeypatch.setattr(triton.knobs.runtime, "launch_exit_hook", hook)  # a plain function, not a chain
    launcher(*_tensors(3))
    assert [len(f.jit_calls) for f in fakes] == [3, 3] and not fakes[0].compiled.calls
    monkeypatch.undo()
    monkeypatch.setattr(direct_launch, "_stream_getter", lambda: lambda device_index: STREAM)
    launcher(*_tensors(4))
    assert len(fakes[0].compiled.calls) == 1


def test_unexpected_setup_keeps_the_jit_path(monkeypatch):
    launcher, plan, fakes = _fake_launcher(monkeypatch)
    del fakes[1].compiled.function  # a Triton whose CompiledKernel looks different
    for seed in (1, 2):
        launcher(*_tensors(seed))
    assert launcher.gave_up and launcher.direct is None
    assert [len(f.jit_calls) for f in fakes] == [2, 2]


def test_a_plan_with_per_call_descriptors_stays_on_the_jit_path(monkeypatch):
    """tma=1: K/U/V descriptors are built from each call's tensors, so the direct path (which bakes
    every non-tensor argument in at setup) must not serve the plan."""
    launcher, plan, fakes = _fake_launcher(monkeypatch, dict(SPLIT_CONFIG, split=1, tma=1))
    calls = [_tensors(seed) for seed in (1, 2)]
    for tensors in calls:
        launcher(*tensors)
    assert launcher.gave_up and launcher.direct is None
    (fake,) = fakes
    assert len(fake.jit_calls) == 2 and not fake.compiled.calls
    for (_grid, args, _kwargs), (q, k, u, v, r, out) in zip(fake.jit_calls, calls):
        assert args[0] is q and args[4] is r and args[5] is out
        descs = args[1:4]  # built on this call's K, U, V
        assert all(d.base is w for d, w in zip(descs, (k, u, v)))
        assert all(list(d.block_shape) == [SPLIT_CONFIG["block_f"], 64] for d in descs)


def test_interpreter_falls_back_to_the_jit_path():
    """Under TRITON_INTERPRET=1 launches return no compiled kernel: every call runs the plan."""
    if not op.uses_kernels(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1")
    mod = load(SPEC)
    launcher = DirectLauncher(mod, mod.contiguous_plan(SHAPE[0], **SPLIT_CONFIG), None)
    for seed in (1, 2):
        q, k, u, v, r, _ = _tensors(seed)
        out = torch.full_like(q, POISON)
        launcher(q, k, u, v, r, out)
        assert rel_error(out, reference_core(q, k, u, v, r)) <= 1e-4
    assert launcher.gave_up and launcher.direct is None


@pytest.mark.gpu
@pytest.mark.parametrize("split", [1, 2])
def test_direct_path_matches_the_jit_path_on_gpu(split):
    spec = Spec("fwd", *SHAPE[1:], "bf16")
    mod = load(spec)
    config = dict(SPLIT_CONFIG, split=split)
    plan = mod.contiguous_plan(SHAPE[0], **config)
    launcher = DirectLauncher(mod, plan, torch.cuda.current_device())
    for seed in (1, 2, 3):
        q, k, u, v, r = core_inputs(*SHAPE, torch.bfloat16, seed=seed, device="cuda")
        direct, jit = torch.full_like(q, POISON), torch.full_like(q, POISON)
        launcher(q, k, u, v, r, direct)
        mod.run_plan(plan, dict(q=q, k=k, u=u, v=v, r=r, out=jit))  # Triton's JIT path
        torch.cuda.synchronize()
        assert torch.equal(direct, jit), seed
    assert launcher.direct is not None, "the direct path was not set up"


@pytest.mark.gpu
def test_op_fast_path_launches_directly_on_gpu():
    fm.reset()
    for seed in (1, 2, 3):
        q, k, u, v, r = core_inputs(1, 2, 2, 64, 2, 32, torch.bfloat16, seed=seed, device="cuda")
        s = fm.flash_mhf(q, k, u, v, r)
        assert rel_error(s.cpu(), reference_core(q, k, u, v, r)) <= TOLERANCE[torch.bfloat16]
    launchers = [ls for *_, ls in op._fast_plans.values() if ls]  # on the current device: on any machine
    (launcher,) = launchers[-1].values()
    assert isinstance(launcher, DirectLauncher) and launcher.direct is not None
