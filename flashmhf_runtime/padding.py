"""Run layers of any width on the generated kernels: zero padding of d_h and d_e.

The templates take d_h in multiples of 8 and d_e in multiples of 16 (``codegen.spec.kernel_dims``).
A layer of other widths runs on the kernels of the next larger ones, on copies of its tensors padded
with zeros: a zero column of q, K, U and V adds nothing to q K^T or q U^T, and a zero row of K, U and
V (a unit of a sub-network) gives m = n = 0, so a = silu(0) * 0 = 0 and it adds nothing to s or to
dr. The padded parts of every output and gradient are then zero too; they are cut off. The price is
the copies (K/U/V per call, and q/ds when d_h is padded): the kernels themselves are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` with its last dim zero-padded to ``width`` (``x`` itself when it already has it)."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def pad_weight(w: torch.Tensor, expert_dim: int, head_dim: int) -> torch.Tensor:
    """A (H_kv, E, d_e, d_h) weight zero-padded to (H_kv, E, expert_dim, head_dim), contiguous."""
    d_e, d_h = w.shape[-2:]
    if (d_e, d_h) == (expert_dim, head_dim):
        return w
    return F.pad(w, (0, head_dim - d_h, 0, expert_dim - d_e)).contiguous()


def cut_weight(w: torch.Tensor, expert_dim: int, head_dim: int) -> torch.Tensor:
    """The (…, expert_dim, head_dim) corner of a padded weight (or its gradient), contiguous."""
    if w.shape[-2:] == (expert_dim, head_dim):
        return w
    return w[..., :expert_dim, :head_dim].contiguous()


def cut_last(x: torch.Tensor, width: int) -> torch.Tensor:
    """The first ``width`` entries of ``x``'s last dim, contiguous."""
    return x if x.shape[-1] == width else x[..., :width].contiguous()
