"""Tensor parallelism over FlashMHF heads with torch.distributed's DTensor.

Heads are independent: with the heads split over the ranks of a 1-D device mesh, W_in is
column-parallel (each rank computes its heads' q), K/U/V, the router and the head norm are sharded on
their head dim, and W_out is row-parallel (one all-reduce of the output). Nothing inside the core
communicates: ``fm.flash_mhf`` called with head-sharded DTensors runs on each rank's local heads.

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from flashmhf_runtime.parallel import head_parallel_plan

    mesh = init_device_mesh("cuda", (world_size,))
    parallelize_module(model, mesh, head_parallel_plan(model))   # every FlashMHF in model

``head_parallel_plan`` composes with the usual plans for attention (ColwiseParallel on q/k/v,
RowwiseParallel on o): merge the dicts. H and H_kv must both be multiples of the mesh size.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from flashmhf_runtime.layer import FlashMHF
from flashmhf_runtime.op import flash_mhf


def _is_head_shard(p: Placement, ndim: int) -> bool:
    """Whether ``p`` shards a (..., H, x) tensor of ``ndim`` dims on H."""
    return isinstance(p, Shard) and p.dim % ndim == ndim - 2


def _fits(name: str, t: DTensor, mesh_dim: int, sharded: bool) -> bool:
    """Whether input ``name`` is placed on ``mesh_dim`` as the core needs when q is ``sharded`` there."""
    p = t.placements[mesh_dim]
    if not sharded:
        return isinstance(p, Replicate)
    return _is_head_shard(p, t.ndim) if name == "r" else p == Shard(0)


def _check_placements(q: DTensor, k: DTensor, u: DTensor, v: DTensor, r: DTensor) -> None:
    """Per mesh dim: q and r sharded on their head dim and k/u/v on dim 0 (H_kv), or all replicated."""
    others = {"k": k, "u": u, "v": v, "r": r}
    for name, t in others.items():
        if not isinstance(t, DTensor) or t.device_mesh != q.device_mesh:
            got = f"DTensor on {t.device_mesh}" if isinstance(t, DTensor) else type(t).__name__
            raise ValueError(f"{name}: expected a DTensor on q's mesh {q.device_mesh}, got {got}")
    for i, p in enumerate(q.placements):
        sharded = _is_head_shard(p, q.ndim)
        if not (sharded or isinstance(p, Replicate)):
            raise ValueError(f"q: expected placements Shard on the head dim ({q.ndim - 2}) or Replicate, "
                             f"got {p!r} on mesh dim {i}")
        for name, t in others.items():
            if not _fits(name, t, i, sharded):
                want = "Replicate" if not sharded else "Shard on the head dim" if name == "r" else "Shard(0)"
                raise ValueError(f"{name}: expected {want} on mesh dim {i} (q: {p!r}), got {t.placements[i]!r}")


def flash_mhf_on_local_shards(q: DTensor, k: DTensor, u: DTensor, v: DTensor, r: DTensor, *,
                              config: dict | None = None) -> DTensor:
    """``fm.flash_mhf`` for DTensors sharded over heads: each rank runs the core on its own heads.

    q (..., H, d_h) and r (..., H, E) sharded on H, k/u/v (H_kv, E, d_e, d_h) on H_kv (or all
    replicated on a mesh dim). The result is s with q's placements; to_local/from_local carry the
    gradients, so backward also runs on local shards only."""
    _check_placements(q, k, u, v, r)
    q_l, k_l, u_l, v_l, r_l = (t.to_local() for t in (q, k, u, v, r))
    # Head h uses kv head h // (H / H_kv): each rank must hold the kv heads of its own heads.
    if q_l.shape[-2] * k.shape[0] != k_l.shape[0] * q.shape[-2]:
        raise ValueError(
            f"k: expected the local share of H_kv={k.shape[0]} kv heads to match q's share of H={q.shape[-2]} "
            f"heads, got {k_l.shape[0]} kv heads for {q_l.shape[-2]} heads on this rank"
        )
    s = flash_mhf(q_l, k_l, u_l, v_l, r_l, config=config)
    return DTensor.from_local(s, q.device_mesh, q.placements, run_check=False, shape=q.shape, stride=q.stride())


def layer_core_on_local_shards(q: DTensor, norm_w: DTensor | None, w_r: DTensor, k: DTensor, u: DTensor,
                               v: DTensor, eps: float) -> DTensor:
    """The layer op (``layer_op.layer_core``) for the DTensors ``HeadParallel`` hands it: q (the
    column-parallel W_in output) sharded on its last dim, the head norm, router and K/U/V weights on
    their head dim. Each rank runs the generated kernels on its own heads; s comes back with q's
    placements (what the row-parallel W_out takes)."""
    from flashmhf_runtime.layer_op import layer_core

    for name, t in (("norm_w", norm_w), ("w_r", w_r), ("k", k), ("u", u), ("v", v)):
        if t is None:
            continue
        if not isinstance(t, DTensor) or t.device_mesh != q.device_mesh:
            raise ValueError(f"{name}: expected a DTensor on q's mesh {q.device_mesh}, got {type(t).__name__}")
        for i, (pq, pt) in enumerate(zip(q.placements, t.placements)):
            sharded = isinstance(pq, Shard) and pq.dim % q.ndim == q.ndim - 1
            if not (sharded and pt == Shard(0)) and not (isinstance(pq, Replicate) and isinstance(pt, Replicate)):
                raise ValueError(f"{name}: expected Shard(0) where q is sharded on its last dim (Replicate where "
                                 f"q is replicated), got q {pq!r} and {name} {pt!r} on mesh dim {i}")
    local = [None if t is None else t.to_local() for t in (q, norm_w, w_r, k, u, v)]
    s = layer_core(*local, eps)
    return DTensor.from_local(s, q.device_mesh, q.placements, run_check=False, shape=q.shape, stride=q.stride())


class HeadParallel(ParallelStyle):
    """The ParallelStyle that splits a ``FlashMHF`` layer's heads over a 1-D mesh (see module doc).

    ``input_layouts``: the layout of the layer's input across ranks (default Replicate; Shard(1) for
    sequence parallelism). ``output_layouts``: the layout of its output (default Replicate, after one
    all-reduce; Shard(1) reduce-scatters instead). ``use_local_output``: return a plain tensor
    (default) or the DTensor."""

    def __init__(self, *, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True) -> None:
        super().__init__()
        self.input_layouts = input_layouts or Replicate()
        self.output_layouts = output_layouts or Replicate()
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, FlashMHF):
            raise ValueError(f"module: expected a FlashMHF, got {type(module).__name__}")
        if device_mesh.ndim != 1:
            raise ValueError(f"device_mesh: expected a 1-D mesh for tensor parallelism, got {device_mesh.ndim} dims")
        ranks = device_mesh.size()
        for name, heads in (("n_heads", module.n_heads), ("n_kv_heads", module.n_kv_heads)):
            if heads % ranks:
                raise ValueError(f"{name}: expected a multiple of the mesh size {ranks}, got {heads}")
        parallelize_module(module.w_in, device_mesh,
                           ColwiseParallel(input_layouts=self.input_layouts, use_local_output=False))
        parallelize_module(module.w_out, device_mesh,
                           RowwiseParallel(input_layouts=Shard(-1), output_layouts=self.output_layouts,
                                           use_local_output=self.use_local_output))
        owners = [(module, "k"), (module, "u"), (module, "v"), (module, "router")]
        if module.head_norm is not None:
            owners.append((module.head_norm, "weight"))
        for owner, name in owners:  # all of them have the head (or kv head) dim first
            param = getattr(owner, name)
            sharded = distribute_tensor(param.data, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
            owner.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        return module


def head_parallel_plan(model: nn.Module, style: HeadParallel | None = None) -> dict[str, ParallelStyle]:
    """A ``parallelize_module`` plan with ``style`` (default ``HeadParallel()``) for every FlashMHF
    inside ``model``, keyed by module name. (A bare layer: ``parallelize_module(layer, mesh, HeadParallel())``.)"""
    style = style or HeadParallel()
    plan = {name: style for name, m in model.named_modules() if name and isinstance(m, FlashMHF)}
    if not plan:
        raise ValueError(f"model: expected a module containing FlashMHF layers, got {type(model).__name__} without any")
    return plan
