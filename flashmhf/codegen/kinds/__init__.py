"""Registry of kernel kinds. Each kind lives in its own module next to its template's name."""

from __future__ import annotations

from flashmhf.codegen.kinds.base import Config, KernelKind, Param, format_config
from flashmhf.codegen.kinds.bwd_dkuv import BWD_DKUV
from flashmhf.codegen.kinds.bwd_dkuv_ws import BWD_DKUV_WS
from flashmhf.codegen.kinds.bwd_dq import BWD_DQ
from flashmhf.codegen.kinds.bwd_dq_ws import BWD_DQ_WS
from flashmhf.codegen.kinds.bwd_fused import BWD_FUSED
from flashmhf.codegen.kinds.fwd import FWD
from flashmhf.codegen.kinds.fwd_ws import FWD_WS
from flashmhf.codegen.kinds.norm_router import NORM_ROUTER, NORM_ROUTER_BWD, ROUTER, ROUTER_BWD

KINDS: dict[str, KernelKind] = {
    k.name: k for k in (FWD, FWD_WS, BWD_DQ, BWD_DQ_WS, BWD_DKUV, BWD_DKUV_WS, BWD_FUSED, NORM_ROUTER, ROUTER,
                        NORM_ROUTER_BWD, ROUTER_BWD)
}


def get_kind(name: str) -> KernelKind:
    from flashmhf.codegen.spec import SpecError

    try:
        return KINDS[name]
    except KeyError:
        raise SpecError(f"kind must be one of {', '.join(KINDS)}, got {name!r}") from None


__all__ = ["KINDS", "Config", "KernelKind", "Param", "format_config", "get_kind"]
