"""Load the authors' public checkpoint layout into ``FlashMHF`` and write it back.

Per layer the authors' module (``MHFFNMoEMultiHeadFFNFlash``, under e.g. ``model.layers.{i}.mlp.``) holds:

=================  =========================  ==========================================
authors' key       shape                      here
=================  =========================  ==========================================
w_self.weight      (d_model, d_model)         w_in.weight
w_self_2.weight    (d_model, d_model)         w_out.weight
gate_weight        (d_ff, H_kv·d_h)           k[g, e, j, i] = gate_weight[e·d_e + j, g·d_h + i]
up_weight          (d_ff, H_kv·d_h)           u (same mapping)
down_weight        (d_ff, H_kv·d_h)           v (same mapping)
router             (H, d_h, E)                router
q_norm.weight      (H, d_h)                   head_norm.weight
=================  =========================  ==========================================

The authors view ``gate_weight`` as (d_ff, H_kv, d_h), move heads first and split d_ff into
(E, d_e), which is the mapping above; their ``mhffnmoe_num_kuv_heads`` is ``n_kv_heads`` here.

``q_norm.weight``: their module always creates it (weight (H, d_h), initialised to ones) but only
applies it when ``mhffnmoe_apply_rmsnorm`` is on. So for a layer built without ``head_norm`` it is
accepted when it is all ones (never trained) and refused otherwise (the checkpoint applied the norm:
build the layer with ``head_norm=True``). A (d_h,) weight, one norm shared by all heads as in a
plain per-head RMSNorm, is broadcast to (H, d_h): that computes exactly the same thing. Writing
back always gives (H, d_h), ones when the layer has no head norm, so their module loads it strictly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from flashmhf_runtime.layer import FlashMHF

KUV_KEYS = {"gate_weight": "k", "up_weight": "u", "down_weight": "v"}
PROJ_KEYS = {"w_self.weight": "w_in", "w_self_2.weight": "w_out"}
ROUTER_KEY = "router"
NORM_KEY = "q_norm.weight"
AUTHORS_KEYS = (*PROJ_KEYS, *KUV_KEYS, ROUTER_KEY, NORM_KEY)


def _shape(shape) -> str:
    return str(tuple(shape))


def kuv_from_authors(w: torch.Tensor, n_kv_heads: int, n_experts: int, head_dim: int) -> torch.Tensor:
    """(d_ff, H_kv·d_h) with row e·d_e + j, column g·d_h + i  ->  (H_kv, E, d_e, d_h)."""
    d_ff = w.shape[0]
    return w.reshape(n_experts, d_ff // n_experts, n_kv_heads, head_dim).permute(2, 0, 1, 3)


def kuv_to_authors(t: torch.Tensor) -> torch.Tensor:
    """(H_kv, E, d_e, d_h)  ->  (d_ff, H_kv·d_h), the inverse of ``kuv_from_authors``."""
    n_kv, n_exp, d_e, d_h = t.shape
    return t.permute(1, 2, 0, 3).reshape(n_exp * d_e, n_kv * d_h)


def _expected_shapes(layer: FlashMHF) -> dict[str, tuple[int, ...]]:
    d, ff = layer.d_model, layer.d_ff
    kuv = (ff, layer.n_kv_heads * layer.head_dim)
    return {
        "w_self.weight": (d, d),
        "w_self_2.weight": (d, d),
        **{key: kuv for key in KUV_KEYS},
        ROUTER_KEY: (layer.n_heads, layer.head_dim, layer.n_experts),
        NORM_KEY: (layer.n_heads, layer.head_dim),
    }


def _norm_weight(layer: FlashMHF, w: torch.Tensor, key: str) -> torch.Tensor:
    """The checkpoint's q_norm weight as (H, d_h) (broadcasting a shared (d_h,) one)."""
    full, shared = (layer.n_heads, layer.head_dim), (layer.head_dim,)
    if tuple(w.shape) == shared:
        return w.expand(full)
    if tuple(w.shape) != full:
        raise ValueError(
            f"state_dict[{key!r}]: expected shape {_shape(full)} or {_shape(shared)}, got {_shape(w.shape)}"
        )
    return w


@torch.no_grad()
def load_authors_state_dict(layer: FlashMHF, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Copy one authors' FFN layer (the keys under ``prefix``, e.g. ``"model.layers.3.mlp."``) into
    ``layer``, converting dtype and device. Every key is checked before any parameter is written:
    missing, unexpected or misshapen keys raise ValueError and leave ``layer`` unchanged."""
    if not isinstance(layer, FlashMHF):
        raise ValueError(f"layer: expected a FlashMHF, got {type(layer).__name__}")
    ours = {key[len(prefix) :]: t for key, t in state_dict.items() if key.startswith(prefix)}
    required = [k for k in AUTHORS_KEYS if k != NORM_KEY or layer.head_norm is not None]
    missing = [prefix + k for k in required if k not in ours]
    unexpected = [prefix + k for k in ours if k not in AUTHORS_KEYS]
    if missing or unexpected:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else ""]
        raise ValueError(
            f"state_dict: expected the authors' FlashMHF layer keys {[prefix + k for k in required]}, "
            f"got {'; '.join(p for p in parts if p)}"
        )
    expected = _expected_shapes(layer)
    for key, t in ours.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state_dict[{prefix + key!r}]: expected a tensor, got {type(t).__name__}")
        if key != NORM_KEY and tuple(t.shape) != expected[key]:
            raise ValueError(
                f"state_dict[{prefix + key!r}]: expected shape {_shape(expected[key])} for {layer.extra_repr()}, "
                f"got {_shape(t.shape)}"
            )

    new: list[tuple[torch.Tensor, torch.Tensor]] = [
        (layer.w_in.weight, ours["w_self.weight"]),
        (layer.w_out.weight, ours["w_self_2.weight"]),
        (layer.router, ours[ROUTER_KEY]),
    ]
    for key, name in KUV_KEYS.items():
        w = kuv_from_authors(ours[key], layer.n_kv_heads, layer.n_experts, layer.head_dim)
        new.append((getattr(layer, name), w))
    if NORM_KEY in ours:
        norm = _norm_weight(layer, ours[NORM_KEY], prefix + NORM_KEY)
        if layer.head_norm is not None:
            new.append((layer.head_norm.weight, norm))
        elif not bool((norm == 1).all()):
            raise ValueError(
                f"state_dict[{prefix + NORM_KEY!r}]: expected all ones for a layer built without head_norm "
                f"(trained values mean the checkpoint applies the per-head RMSNorm: build the layer with "
                f"head_norm=True), got values in [{norm.min().item():g}, {norm.max().item():g}]"
            )
    for param, value in new:
        param.copy_(value)


@torch.no_grad()
def to_authors_state_dict(layer: FlashMHF, prefix: str = "") -> dict[str, torch.Tensor]:
    """The authors' keys for ``layer`` (fresh contiguous tensors in the layer's dtype and device)."""
    if not isinstance(layer, FlashMHF):
        raise ValueError(f"layer: expected a FlashMHF, got {type(layer).__name__}")
    out = {
        "w_self.weight": layer.w_in.weight.detach().clone(),
        "w_self_2.weight": layer.w_out.weight.detach().clone(),
        **{key: kuv_to_authors(getattr(layer, name).detach()).contiguous() for key, name in KUV_KEYS.items()},
        ROUTER_KEY: layer.router.detach().clone(),
    }
    if layer.head_norm is not None:
        out[NORM_KEY] = layer.head_norm.weight.detach().clone()
    else:  # the authors' module always carries it; ones = identity scale, never applied
        out[NORM_KEY] = torch.ones(layer.n_heads, layer.head_dim, dtype=layer.router.dtype, device=layer.router.device)
    return {prefix + key: t for key, t in out.items()}
