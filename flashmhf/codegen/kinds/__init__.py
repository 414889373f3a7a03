"""Registry of kernel kinds. Each kind lives in its own module next to its template's name and
declares its role, needs, minimum tokens and fallback there; adding a kind is its module, its
template and one entry of ``_REGISTERED`` (``flashmhf.codegen.registry`` chooses among them)."""

from __future__ import annotations

from flashmhf.codegen.kinds.base import (
    BACKWARD,
    CORE_ROLES,
    DKUV,
    DQ,
    FORWARD,
    NORM_ROUTER,
    NORM_ROUTER_BWD,
    NORM_ROUTER_CORE,
    ROUTER,
    ROUTER_BWD,
    ROUTER_CORE,
    Config,
    KernelKind,
    Param,
    Role,
    format_config,
)
from flashmhf.codegen.kinds.bwd_dkuv import BWD_DKUV
from flashmhf.codegen.kinds.bwd_dkuv_ws import BWD_DKUV_WS
from flashmhf.codegen.kinds.bwd_dq import BWD_DQ
from flashmhf.codegen.kinds.bwd_dq_ws import BWD_DQ_WS
from flashmhf.codegen.kinds.bwd_fused import BWD_FUSED
from flashmhf.codegen.kinds.fwd import FWD
from flashmhf.codegen.kinds.fwd_ws import FWD_WS
from flashmhf.codegen.kinds.fwd_ws_split import FWD_WS_SPLIT
from flashmhf.codegen.kinds.norm_router import NORM_ROUTER_BWD_KIND, NORM_ROUTER_KIND, ROUTER_BWD_KIND, ROUTER_KIND
from flashmhf.codegen.kinds.norm_router_core import NORM_ROUTER_CORE_KIND, ROUTER_CORE_KIND

# Within a role the runtime prefers the kinds no other kind falls back to (in this order), then their
# fallbacks.
_REGISTERED = (FWD, FWD_WS, FWD_WS_SPLIT, BWD_DQ, BWD_DQ_WS, BWD_DKUV, BWD_DKUV_WS, BWD_FUSED, NORM_ROUTER_KIND,
               ROUTER_KIND, NORM_ROUTER_BWD_KIND, ROUTER_BWD_KIND, NORM_ROUTER_CORE_KIND, ROUTER_CORE_KIND)
KINDS: dict[str, KernelKind] = {k.name: k for k in _REGISTERED}


def get_kind(name: str) -> KernelKind:
    from flashmhf.codegen.spec import SpecError

    try:
        return KINDS[name]
    except KeyError:
        raise SpecError(f"kind must be one of {', '.join(KINDS)}, got {name!r}") from None


__all__ = ["BACKWARD", "CORE_ROLES", "DKUV", "DQ", "FORWARD", "KINDS", "NORM_ROUTER", "NORM_ROUTER_BWD",
           "NORM_ROUTER_CORE", "ROUTER", "ROUTER_BWD", "ROUTER_CORE", "Config", "KernelKind", "Param", "Role",
           "format_config", "get_kind"]
