"""Single-process training recipes with FlashMHF: meta-device init and activation checkpointing.
(The distributed ones, with 2 ranks, are in test_parallel.py.)"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from tests.test_parallel import D_MODEL, inputs, make_model


def test_meta_init_then_to_empty_and_reset_parameters_equals_an_eager_init():
    eager = make_model()
    meta = make_model("meta")
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    for model in (eager, meta):
        torch.manual_seed(3)
        for block in model:
            block.reset_parameters()
    for (name, p), q in zip(eager.named_parameters(), meta.parameters()):
        assert torch.equal(p, q), name
    assert eager[0].ffn.k.std() > 0.01  # initialised, not zeros


def test_activation_checkpointing_gives_the_same_gradients():
    x, w = inputs()
    grads, calls = [], []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = make_model()
        calls.append(0)
        for block in model:
            block.ffn.register_forward_pre_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))
        xt = x[:1, :3].clone().requires_grad_()
        y = xt
        for block in model:  # non-reentrant: recomputes the block (and its FlashMHF core) in backward
            y = checkpoint(block, y, use_reentrant=False) if checkpointed else block(y)
        (y * w[:1, :3]).sum().backward()
        grads.append([xt.grad, *(p.grad for p in model.parameters())])
    assert calls == [2, 4]  # checkpointed: each FlashMHF runs again in backward
    for g, g_ckpt in zip(*grads):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-6, atol=1e-7)
    assert grads[0][0].shape == (1, 3, D_MODEL)
