"""The whole layer in eager mode: W_in, the layer op and W_out as one autograd node.

Run as modules, a layer's training step goes through three autograd nodes (two ``nn.Linear`` and the
layer op) plus the views between them, and each node costs host time that a step at a small or mid
token count cannot spare (the GPU finishes a repo-1.3b step at T = 1024 in ~0.75 ms). ``layer`` runs
the same maths as ``FlashMHF.forward`` (``F.linear``, ``layer_op.layer_core_forward``, ``F.linear``)
in one ``torch.autograd.Function`` and saves what the three nodes saved (x, q, s and the weights),
so memory stays as it was. Its backward runs the W_in and W_out products once the layer op's
backward has returned and ds is freed, as the modules' backward does: enqueued earlier, beside the
core's dK/dU/dV kernel, they gained no measurable time on an H200 and raised the peak of a repo-1.3b
step at T = 16384 from 505 to 638 MiB (dx and the weight gradients on top of the core's buffers).

``usable`` says when this path may stand in for the modules: plain tensors of one dtype, projections
that are plain bias-free ``nn.Linear`` without hooks, no autocast, not compiling. Everything else
(torch.compile, tensor parallel, autocast, a swapped core, wrapped projections such as LoRA) takes
the general path, which calls the modules and the layer's custom op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from flashmhf_runtime.layer_op import layer_core_backward, layer_core_forward, prepared_forward


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for this device type; False for types autocast does not know (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _no_global_hooks() -> bool:
    """No module-wide hook is registered (``nn.modules.module.register_module_forward_hook`` & co.)."""
    return not (_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
                or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks)


def _plain_linear(m: nn.Module) -> bool:
    """A bias-free ``nn.Linear`` (not a subclass, not parametrized) whose call would do nothing but F.linear."""
    params = m._parameters  # not m.weight: nn.Module.__getattr__ is slow for a per-call check
    return (type(m) is nn.Linear and params.get("bias") is None and type(params.get("weight")) is nn.Parameter
            and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks))


def usable(x: torch.Tensor, w_in: nn.Module, w_out: nn.Module, k: torch.Tensor) -> bool:
    """Whether ``layer`` may run this call in place of the modules (see the module docstring)."""
    return (type(x) is torch.Tensor and type(k) is nn.Parameter and _plain_linear(w_in) and _plain_linear(w_out)
            and x.dtype == k.dtype == w_in._parameters["weight"].dtype == w_out._parameters["weight"].dtype
            and not torch.compiler.is_compiling() and not autocast_on(x.device.type)
            and _no_global_hooks())


class _Layer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, norm_w, w_r, k, u, v, w_out, eps):
        q = F.linear(x, w_in)
        s = layer_core_forward(q, norm_w, w_r, k, u, v, eps)
        ctx.save_for_backward(x, q, s, w_in, norm_w, w_r, k, u, v, w_out)  # what the three nodes saved
        ctx.eps = eps
        return F.linear(s, w_out)

    @staticmethod
    def backward(ctx, dy):
        x, q, s, w_in, norm_w, w_r, k, u, v, w_out = ctx.saved_tensors
        need_x, need_w_in, need_norm, need_w_r, need_k, need_u, need_v, need_w_out = ctx.needs_input_grad[:8]
        width = x.shape[-1]
        dy2 = dy.reshape(-1, width)
        need_q_side, need_dkuv = need_x or need_w_in or need_norm or need_w_r, need_k or need_u or need_v
        grads = (None,) * 6
        if need_q_side or need_dkuv:
            ds = torch.mm(dy2, w_out).view(q.shape)
            grads = layer_core_backward(q, norm_w, w_r, k, u, v, ds, ctx.eps, need_q_side, need_dkuv)
            del ds  # freed before dx is made: the peak stays that of the core's backward
        dx = dw_in = None
        if need_q_side:
            dq2 = grads[0].view(-1, width)
            if need_x:
                dx = torch.mm(dq2, w_in).view(x.shape)
            if need_w_in:
                dw_in = torch.mm(dq2.t(), x.reshape(-1, width))
        dw_out = torch.mm(dy2.t(), s.reshape(-1, width)) if need_w_out else None
        _dq, dnorm_w, dw_r, dk, du, dv = grads
        return (dx, dw_in, dnorm_w if need_norm else None, dw_r if need_w_r else None, dk if need_k else None,
                du if need_u else None, dv if need_v else None, dw_out, None)


def layer(x: torch.Tensor, w_in: torch.Tensor, norm_w: torch.Tensor | None, w_r: torch.Tensor, k: torch.Tensor,
          u: torch.Tensor, v: torch.Tensor, w_out: torch.Tensor, eps: float) -> torch.Tensor:
    """The FlashMHF layer y = W_out core(norm(W_in x)) for plain tensors of one dtype (``usable``):
    one autograd node when a gradient is wanted, three calls without autograd otherwise."""
    if torch.is_grad_enabled() and (x.requires_grad or w_in.requires_grad or w_r.requires_grad or k.requires_grad
                                    or u.requires_grad or v.requires_grad or w_out.requires_grad
                                    or (norm_w is not None and norm_w.requires_grad)):
        return _Layer.apply(x, w_in, norm_w, w_r, k, u, v, w_out, eps)
    # q is shaped like x (W_in is square): the layer op's fast path is set up before W_in is enqueued.
    run = prepared_forward(x, norm_w, w_r, k, u, v, eps)
    q = F.linear(x, w_in)
    s = run(q) if run is not None and q.is_contiguous() else layer_core_forward(q, norm_w, w_r, k, u, v, eps)
    return F.linear(s, w_out)
