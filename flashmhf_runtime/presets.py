"""Layer shapes of the paper (Table 4) and of the authors' public configs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    d_model: int
    n_heads: int
    head_dim: int
    d_ff: int
    n_experts: int
    expert_dim: int
    head_norm: bool
    source: str
    n_kv_heads: int | None = None

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(H, H_kv, d_h, E, d_e): the layer shape as kernel specs and cache keys name it."""
        return (self.n_heads, self.kv_heads, self.head_dim, self.n_experts, self.expert_dim)


def _p(name: str, d_model: int, h: int, d_h: int, d_ff: int, e: int, d_e: int, norm: bool, src: str) -> Preset:
    if d_model != h * d_h or d_ff != e * d_e:
        raise ValueError(f"preset {name}: d_model must be H * d_h and d_ff must be E * d_e")
    return Preset(name, d_model, h, d_h, d_ff, e, d_e, norm, src)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _p("paper-128m", 768, 6, 128, 2048, 8, 256, False, "paper Table 4"),
        _p("paper-370m", 1024, 8, 128, 2688, 7, 384, False, "paper Table 4"),
        _p("paper-1.3b", 2048, 16, 128, 5760, 15, 384, False, "paper Table 4"),
        _p("repo-128m", 768, 8, 96, 2048, 8, 256, False, "authors' public configs"),
        _p("repo-370m", 1024, 8, 128, 2816, 11, 256, True, "authors' public configs"),
        _p("repo-1.3b", 2048, 16, 128, 5632, 22, 256, True, "authors' public configs"),
    )
}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name`` or raise ``ValueError`` listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}") from None
