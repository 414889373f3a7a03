"""The static description of one generated kernel: layer shape, dtype and kernel kind."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flashmhf.codegen.dtypes import DTYPES


class SpecError(ValueError):
    """A spec or config that no template can serve; the message says why."""


@dataclass(frozen=True)
class Spec:
    """Everything a template is specialised on. Token count is not here: it is a runtime value."""

    kind: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    expert_dim: int
    dtype: str

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def d_ff(self) -> int:
        return self.n_experts * self.expert_dim

    @property
    def d_model(self) -> int:
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """Short human-readable name, e.g. ``fwd H16/16 d_h128 E22x256 bf16``."""
        return (
            f"{self.kind} H{self.n_heads}/{self.n_kv_heads} d_h{self.head_dim} "
            f"E{self.n_experts}x{self.expert_dim} {self.dtype}"
        )


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SpecError(f"{name} must be a positive integer, got {value!r}")


def validate_spec(spec: Spec, known_kinds: tuple[str, ...]) -> None:
    """Raise :class:`SpecError` with the reason if no template can be generated for ``spec``."""
    if spec.kind not in known_kinds:
        raise SpecError(f"kind must be one of {', '.join(known_kinds)}, got {spec.kind!r}")
    for name in ("n_heads", "n_kv_heads", "head_dim", "n_experts", "expert_dim"):
        _positive(name, getattr(spec, name))
    if spec.n_heads % spec.n_kv_heads:
        raise SpecError(
            f"n_heads must be divisible by n_kv_heads, got n_heads={spec.n_heads}, n_kv_heads={spec.n_kv_heads}"
        )
    if spec.dtype not in DTYPES:
        raise SpecError(f"dtype must be one of {', '.join(DTYPES)}, got {spec.dtype!r}")
    if spec.head_dim % 16 or spec.head_dim > 256:
        raise SpecError(f"head_dim must be a multiple of 16 and at most 256 (tensor-core tiles), got {spec.head_dim}")
    if spec.expert_dim % 16:
        raise SpecError(f"expert_dim must be a multiple of 16 (tensor-core tiles), got {spec.expert_dim}")
