"""ReplayLauncher: a module launch called again on the same memory hands the C launcher the
arguments Triton built the first time. CPU tests use a stand-in module and launcher; the GPU test
compares replayed launches of the real kinds with launches through the JIT."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from triton.backends.nvidia.driver import CudaLauncher

from flashmhf_runtime import jit_memo
from flashmhf_runtime.replay_launch import MAX_TEMPORARY_CALLS, ReplayLauncher


class RawLaunch:
    """Stands in for Triton's C launch function (no __code__: what replay_launch calls directly)."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


class FakeCudaLauncher(CudaLauncher):
    """Triton's CUDA launcher as replay_launch reads it, around a stand-in C launch function."""

    def __init__(self, raw):  # no kernel to build a launcher for
        self.launch = raw
        self.global_scratch_size = self.profile_scratch_size = 0
        self.launch_cooperative_grid = self.launch_pdl = False


class FakeModule:
    """A rendered module's launch: one kernel launch on its arguments, recorded as MemoKernel does."""

    def __init__(self, extra_pointer: torch.Tensor | None = None, descriptor: bool = False):
        self.raw = RawLaunch()
        launcher = FakeCudaLauncher(self.raw)
        self.compiled = SimpleNamespace(run=launcher, function="fn", packed_metadata="packed",
                                        metadata=SimpleNamespace(tensordesc_meta=None))
        self.extra_pointer, self.descriptor, self.calls = extra_pointer, descriptor, 0

    def launch(self, x, out, n, *, block):
        self.calls += 1
        first = x
        if self.descriptor:
            first = SimpleNamespace(base=x, shape=[n], strides=[1], block_shape=[block], padding="zero")
        values = (first, out, n, block) if self.extra_pointer is None else (first, self.extra_pointer, n, block)
        if jit_memo.RECORDING.launches is not None:
            jit_memo.RECORDING.launches.append((self.compiled, (3, 1, 1), 0, values))


def replay(module: FakeModule) -> ReplayLauncher:
    launcher = ReplayLauncher(module.launch, {"block": 32})
    launcher.usable = True  # the test suite runs under Triton's interpreter
    launcher._knobs = SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    launcher._stream = lambda device: 7
    launcher._device = lambda: 0
    return launcher


def test_the_same_memory_replays_the_recorded_launch():
    module = FakeModule()
    launcher = replay(module)
    x, out = torch.zeros(8), torch.zeros(8)
    launcher(x, out, 8)
    launcher(x, out, 8)
    assert module.calls == 1
    assert module.raw.calls == [(3, 1, 1, 7, "fn", False, False, None, None, "packed", None, None, None,
                                 x.data_ptr(), out.data_ptr(), 8, 32)]


def test_new_memory_or_values_go_through_the_module_again():
    module = FakeModule()
    launcher = replay(module)
    x, out = torch.zeros(8), torch.zeros(8)
    launcher(x, out, 8)
    launcher(torch.zeros(8), out, 8)  # another address
    launcher(x, out, 7)  # another value
    launcher(x.view(2, 4), out, 8)  # same address, another shape
    launcher(x.view(torch.int32), out, 8)  # same address and shape, another dtype
    assert module.calls == 5 and module.raw.calls == []


def test_descriptors_are_expanded_as_triton_expands_them():
    module = FakeModule(descriptor=True)
    launcher = replay(module)
    x, out = torch.zeros(8), torch.zeros(8)
    launcher(x, out, 8)
    launcher(x, out, 8)
    # without TMA metadata: base, shape, strides, nan padding, shape, strides (driver.make_tensordesc_arg)
    assert module.raw.calls[0][13:] == (x.data_ptr(), 8, 1, False, 8, 1, out.data_ptr(), 8, 32)


def test_a_pointer_that_is_not_an_argument_is_not_kept():
    temporary = torch.zeros(4)  # e.g. a workspace allocated inside launch, or a copy of an input
    module = FakeModule(extra_pointer=temporary)
    launcher = replay(module)
    x, out = torch.zeros(8), torch.zeros(8)
    launcher(x, out, 8)
    launcher(x, out, 8)
    assert module.calls == 2 and module.raw.calls == [] and not launcher.replays
    module.extra_pointer = None  # a later call without one is kept and replayed
    launcher(x, out, 8)
    launcher(x, out, 8)
    assert launcher.usable and module.calls == 3 and len(module.raw.calls) == 1


def test_a_launch_that_always_makes_its_own_memory_stops_being_recorded():
    module = FakeModule(extra_pointer=torch.zeros(4))
    launcher = replay(module)
    x, out = torch.zeros(8), torch.zeros(8)
    for _ in range(MAX_TEMPORARY_CALLS):
        assert launcher.usable
        launcher(x, out, 8)
    assert not launcher.usable and module.raw.calls == []


def test_a_launch_that_cannot_be_recorded_turns_replay_off():
    module = FakeModule()
    launcher = replay(module)
    module_launch = module.launch

    def unrecordable(*args, **kwargs):
        module_launch(*args, **kwargs)
        if jit_memo.RECORDING.launches is not None:  # recording: e.g. a launch hook, or the interpreter
            jit_memo.RECORDING.launches[-1] = None

    launcher.launch = unrecordable
    x, out = torch.zeros(8), torch.zeros(8)
    launcher(x, out, 8)
    launcher(x, out, 8)
    assert not launcher.usable and module.calls == 2


def test_another_backends_launcher_turns_replay_off():
    module = FakeModule()
    module.compiled.run = SimpleNamespace(**vars(module.compiled.run))  # same attributes, not a CudaLauncher
    launcher = replay(module)
    x, out = torch.zeros(8), torch.zeros(8)
    launcher(x, out, 8)
    launcher(x, out, 8)
    assert not launcher.usable and module.calls == 2 and module.raw.calls == []


def test_an_unhashable_argument_takes_the_module_path():
    module = FakeModule()
    launcher = replay(module)
    x, out = torch.zeros(8), torch.zeros(8)
    launcher(x, out, [8])
    launcher(x, out, [8])
    assert module.calls == 2 and module.raw.calls == [] and launcher.usable


def test_a_launch_hook_takes_the_module_path():
    module = FakeModule()
    launcher = replay(module)
    x, out = torch.zeros(8), torch.zeros(8)
    launcher(x, out, 8)
    launcher._knobs = SimpleNamespace(launch_enter_hook=lambda *a: None, launch_exit_hook=None)
    launcher(x, out, 8)
    assert module.calls == 2 and module.raw.calls == []


def test_a_launch_inside_another_record_makes_that_record_unusable():
    inner_module, outer_module = FakeModule(), FakeModule()
    inner = replay(inner_module)
    outer_launch = outer_module.launch

    def launch_calling_another(x, out, n, *, block):
        outer_launch(x, out, n, block=block)
        inner(x, out, n)

    outer = replay(outer_module)
    outer.launch = launch_calling_another
    x, out = torch.zeros(8), torch.zeros(8)
    outer(x, out, 8)
    outer(x, out, 8)
    assert not outer.usable and outer_module.calls == 2
    assert inner.usable and inner_module.calls == 1 and len(inner_module.raw.calls) == 1


def test_recording_is_off_outside_a_record():
    module = FakeModule()
    replay(module)(torch.zeros(8), torch.zeros(8), 8)
    assert jit_memo.RECORDING.launches is None


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fwd_ws", "bwd_dq_ws", "bwd_dkuv_ws", "norm_router", "fwd"])
def test_replayed_launches_match_the_module_bit_for_bit(kind):
    from flashmhf.codegen import Spec, get_kind
    from flashmhf.tuner.harness import make_problem
    from tests.helpers import rel_error

    spec = Spec(kind, 16, 16, 128, 22, 256, "bf16")
    config = get_kind(kind).default(spec, 1024)
    problem = make_problem(spec, 1000, "cuda", seed=0)
    launcher = ReplayLauncher(jit_memo.runtime_load(spec).launch, config)
    outs = []
    for _ in range(3):  # recorded, then replayed twice on the same memory
        for t in problem.outputs:
            t.fill_(float("nan"))
        launcher(*problem.args)
        torch.cuda.synchronize()
        outs.append([t.clone() for t in problem.outputs])
    if kind.endswith("_ws"):
        assert launcher.usable and len(launcher.replays) == 1
    for out, ref in zip(outs[-1], problem.reference):
        assert rel_error(out, ref) <= problem.tolerance
    for later in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], later))
