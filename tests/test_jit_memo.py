"""MemoKernel: repeated launches skip Triton's JIT dispatch, with a key at least as fine as its
specialisation. CPU tests use a stand-in kernel; the GPU test compares with the JIT on real kinds."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from flashmhf_runtime import jit_memo


class FakeCompiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "fn", "meta"

    def run(self, *launch):
        self.log.append(("direct", launch))


class FakeKernel:
    """What MemoKernel uses of a JITFunction: kernel[grid](...) and the parameter names."""

    def __init__(self):
        self.log = []
        self.compiled = FakeCompiled(self.log)

        def fn(x_ptr, n, scale, BLOCK: int = 16):
            pass

        self.signature = inspect.signature(fn)
        self.arg_names = list(self.signature.parameters)

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return self.compiled
        return call


def memo(kernel) -> jit_memo.MemoKernel:
    m = jit_memo.MemoKernel(kernel)
    m._knobs = SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    m._stream = lambda device: 7
    m._device = lambda: 0
    return m


def test_second_launch_goes_straight_to_the_compiled_kernel():
    k = FakeKernel()
    m = memo(k)
    x = torch.zeros(8)
    assert m[(4,)](x, 100, 0.5, BLOCK=32, num_warps=4) is k.compiled
    assert m[(4,)](x, 100, 0.25, BLOCK=32, num_warps=4) is k.compiled
    assert [e[0] for e in k.log] == ["jit", "direct"]
    # grid padded to 3 dims, the stream, the kernel, no hooks, then every parameter in order
    assert k.log[1][1] == (4, 1, 1, 7, "fn", "meta", None, None, None, x, 100, 0.25, 32)


@pytest.mark.parametrize("change", ["dtype", "alignment", "int", "constexpr", "grid", "hook"])
def test_anything_the_jit_specialises_on_takes_the_jit(change):
    k = FakeKernel()
    m = memo(k)
    x = torch.zeros(8)
    m[(4,)](x, 100, 0.5, BLOCK=32)
    args, kwargs, grid = [x, 100, 0.5], {"BLOCK": 32}, (4,)
    if change == "dtype":
        args[0] = torch.zeros(8, dtype=torch.float16)
    elif change == "alignment":
        args[0] = torch.zeros(9)[1:]
    elif change == "int":
        args[1] = 101
    elif change == "constexpr":
        kwargs["BLOCK"] = 64
    elif change == "grid":
        grid = (5,)
    else:
        m._knobs = SimpleNamespace(launch_enter_hook=lambda *a: None, launch_exit_hook=None)
    m[grid](*args, **kwargs)
    assert [e[0] for e in k.log] == ["jit", "jit"]


def test_descriptors_are_keyed_by_their_properties():
    k = FakeKernel()
    m = memo(k)
    base = torch.zeros(64, 16)
    desc = SimpleNamespace(base=base, shape=[64, 16], strides=[16, 1], block_shape=[32, 16], layout=None)
    m[(1,)](desc, 1, 1.0)
    m[(1,)](SimpleNamespace(**{**vars(desc)}), 1, 1.0)  # a new descriptor object, same properties
    m[(1,)](SimpleNamespace(**{**vars(desc), "block_shape": [16, 16]}), 1, 1.0)
    assert [e[0] for e in k.log] == ["jit", "direct", "jit"]


def test_install_wraps_launched_kernels_only():
    from triton.runtime.jit import JITFunction

    class Launched(JITFunction):
        def __init__(self):  # no source to parse: only the type matters here
            pass

    module = SimpleNamespace(flashmhf_fwd=Launched(), _helper=Launched(), flashmhf_other=3)
    jit_memo.install(module)
    assert isinstance(module.flashmhf_fwd, jit_memo.MemoKernel)
    assert isinstance(module._helper, Launched) and module.flashmhf_other == 3


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fwd_ws", "bwd_dq_ws", "bwd_dkuv_ws", "norm_router_bwd"])
def test_memo_launches_match_the_jit_bit_for_bit(kind):
    from flashmhf.codegen import Spec, get_kind, load
    from flashmhf.tuner.harness import make_problem

    spec = Spec(kind, 16, 16, 128, 22, 256, "bf16")
    memo_module, plain = jit_memo.runtime_load(spec), load(spec)
    assert memo_module is plain  # wrapped in place
    problem = make_problem(spec, 4096, "cuda", seed=0)
    config = get_kind(kind).default(spec, 4096)
    outs = []
    for _ in range(3):  # first launch through the JIT, then through the memo
        problem.check(config)
        outs.append([t.clone() for t in problem.outputs])
    assert problem.check(config) <= problem.tolerance
    for later in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], later))
