"""BackwardTimer (flashmhf.bench.host_profile): times and profiles the eager layer's backward body on
the thread that runs it, and puts the layer back as it was."""

from __future__ import annotations

import cProfile
import pstats

import torch

import flashmhf_runtime as fm
from flashmhf.bench.host_profile import BackwardTimer, profile_table
from flashmhf.bench.layer import training_step
from flashmhf_runtime import layer_eager


def test_backward_timer_times_and_profiles_the_body_then_restores_it():
    torch.manual_seed(0)
    layer = fm.FlashMHF(32, 2, 64, 2, head_norm=True, dtype=torch.float32)
    x = torch.randn(5, 32, requires_grad=True)
    dy = torch.randn(5, 32)
    original = layer_eager._Layer.backward
    want = training_step(layer, x, dy)
    with BackwardTimer() as timer:
        timer.profiler = cProfile.Profile()
        got = training_step(layer, x, dy)
    assert layer_eager._Layer.backward is original
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    (start, end), = timer.spans
    assert end > start
    functions = {name for (_file, _line, name) in pstats.Stats(timer.profiler).stats}
    assert "layer_core_backward" in functions
    assert "Ordered by: internal time" in profile_table(timer.profiler, 5)
