"""The static description of one generated kernel: layer shape, dtype and kernel kind."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flashmhf.codegen.dtypes import DTYPES

# The widths the templates take: rows of K/U/V (d_h values) must be 16-byte multiples for tensor
# descriptors, and a d_ff tile (inside one sub-network) has at least 16 rows, an MMA's K side. A
# layer of other widths runs on kernels for the next larger ones (``kernel_dims``): the runtime pads
# its tensors with zeros, which add nothing to any product.
HEAD_DIM_MULTIPLE = 8
EXPERT_DIM_MULTIPLE = 16
MAX_HEAD_DIM = 256  # the widest head a tile holds (d_h padded to a power of two, at most 256)


class SpecError(ValueError):
    """A spec or config that no template can serve; the message says why."""


@dataclass(frozen=True, order=True)
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

    def as_tuple(self) -> tuple:
        """(kind, H, H_kv, d_h, E, d_e, dtype), the fields in order; ``Spec(*t)`` is the inverse. The
        runtime's per-call memo keys are such tuples: a tuple hashes about three times faster than a
        dataclass."""
        return (self.kind, self.n_heads, self.n_kv_heads, self.head_dim, self.n_experts, self.expert_dim,
                self.dtype)

    def label(self) -> str:
        """Short human-readable name, e.g. ``fwd H16/16 d_h128 E22x256 bf16``."""
        return (
            f"{self.kind} H{self.n_heads}/{self.n_kv_heads} d_h{self.head_dim} "
            f"E{self.n_experts}x{self.expert_dim} {self.dtype}"
        )


def kernel_dims(head_dim: int, expert_dim: int) -> tuple[int, int]:
    """(d_h, d_e) of the kernels that run a layer with these widths: each rounded up to a multiple
    the templates take (unchanged when it already is one)."""
    return -(-head_dim // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE, \
        -(-expert_dim // EXPERT_DIM_MULTIPLE) * EXPERT_DIM_MULTIPLE


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
    if spec.head_dim > MAX_HEAD_DIM:
        raise SpecError(f"head_dim must be at most {MAX_HEAD_DIM} (one tile holds a head), got {spec.head_dim}")
    if spec.head_dim % HEAD_DIM_MULTIPLE:
        raise SpecError(f"head_dim must be a multiple of {HEAD_DIM_MULTIPLE} (16-byte rows), got {spec.head_dim}; "
                        f"a layer of that width runs on kernels for head_dim={kernel_dims(spec.head_dim, 16)[0]}")
    if spec.expert_dim % EXPERT_DIM_MULTIPLE:
        raise SpecError(f"expert_dim must be a multiple of {EXPERT_DIM_MULTIPLE} (tensor-core tiles), got "
                        f"{spec.expert_dim}; a layer of that width runs on kernels for "
                        f"expert_dim={kernel_dims(8, spec.expert_dim)[1]}")
