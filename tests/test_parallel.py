"""FlashMHF under torch.distributed on 2 CPU ranks (gloo): tensor parallel over heads, DDP, FSDP2, and
FSDP2 with a model built on the meta device. Each check's outputs and gradients are compared with the
same computation in one process.

One spawn of 2 ranks runs every check (starting processes dominates the time); each rank records, per
check, the distributed results next to the single-process ones, or the error it raised. The ranks
run the core's reference path (TRITON_INTERPRET=0): what is tested here is the sharding.
"""

from __future__ import annotations

import contextlib
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import flashmhf_runtime as fm

WORLD = 2
D_MODEL, HEADS, D_FF, EXPERTS = 64, 4, 64, 2
pytestmark = pytest.mark.slow


class Block(nn.Module):
    """Pre-norm residual FFN block, the FlashMHF part of a decoder layer."""

    def __init__(self, **kw) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(D_MODEL)
        self.ffn = fm.FlashMHF(D_MODEL, HEADS, D_FF, EXPERTS, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        self.ffn.reset_parameters()


def make_model(device: str | torch.device = "cpu") -> nn.Sequential:
    """Two blocks, GQA (2 kv heads for 4 heads) and head norm in the first, with trained-looking norms."""
    with torch.device(device):
        model = nn.Sequential(Block(n_kv_heads=2, head_norm=True), Block())
    if device != "meta":
        with torch.no_grad():
            model[0].ffn.head_norm.weight.uniform_(0.5, 1.5)
    return model


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x (4, 5, d_model) and the fixed weights of the loss sum(y * w) (so no gradient is symmetric)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * WORLD, 5, D_MODEL, generator=g), torch.randn(2 * WORLD, 5, D_MODEL, generator=g)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def settled(t: torch.Tensor) -> torch.Tensor:
    """A plain copy of ``t``: the copy waits for the collective that may still be writing it (an
    AsyncCollectiveTensor, as tensor-parallel outputs and input gradients are)."""
    return full(t).detach().clone()


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace("module.", ""): settled(p.grad) for n, p in model.named_parameters()}


def single_process(model: nn.Module, x: torch.Tensor, w: torch.Tensor, scale: float = 1.0):
    """(output, x.grad, parameter grads) of the loss sum(model(x) * w) * scale in this process."""
    x = x.clone().requires_grad_()
    y = model(x)
    (y * w).sum().mul(scale).backward()
    return y.detach(), x.grad, grads(model)


def check_tensor_parallel(rank: int, mesh) -> dict:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    from flashmhf_runtime.parallel import HeadParallel, head_parallel_plan

    refused = []
    try:  # one kv head cannot be split over 2 ranks
        parallelize_module(fm.FlashMHF(D_MODEL, HEADS, D_FF, EXPERTS, n_kv_heads=1), mesh, HeadParallel())
        refused.append(None)
    except ValueError as e:
        refused.append(str(e))
    q, k, u, v, r = (torch.randn(3, HEADS, 8), *(torch.randn(2, EXPERTS, 4, 8) for _ in range(3)),
                     torch.rand(3, HEADS, EXPERTS))
    q, r = (distribute_tensor(t, mesh, [Shard(1)]) for t in (q, r))
    k, v = (distribute_tensor(t, mesh, [Shard(0)]) for t in (k, v))
    u = distribute_tensor(u, mesh, [Replicate()])  # k/v sharded with the heads, u not
    try:
        fm.flash_mhf(q, k, u, v, r)
        refused.append(None)
    except ValueError as e:
        refused.append(str(e))

    torch.manual_seed(0)
    model, ref = make_model(), make_model()
    ref.load_state_dict(model.state_dict())
    x, w = inputs()
    parallelize_module(model, mesh, head_parallel_plan(model))
    placements = {n: str(getattr(p, "placements", "not a DTensor")) for n, p in model.named_parameters()}
    xt = x.clone().requires_grad_()
    y = model(xt)
    (y * w).sum().backward()
    return {"dist": (settled(y), settled(xt.grad), grads(model)), "ref": single_process(ref, x, w),
            "placements": placements, "refused": refused}


def check_sequence_parallel(rank: int, mesh) -> dict:
    """HeadParallel with the sequence sharded outside the layer: all-gather in, reduce-scatter out."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import parallelize_module

    from flashmhf_runtime.parallel import HeadParallel

    torch.manual_seed(0)
    layer, ref = make_model()[0].ffn, make_model()[0].ffn
    ref.load_state_dict(layer.state_dict())
    x, w = (t[:, :4] for t in inputs())
    parallelize_module(layer, mesh, HeadParallel(input_layouts=Shard(1), output_layouts=Shard(1)))
    mine = slice(2 * rank, 2 * rank + 2)  # this rank's positions
    xt = x[:, mine].clone().requires_grad_()
    y = layer(xt)
    (y * w[:, mine]).sum().backward()
    ref_y, ref_dx, ref_grads = single_process(ref, x, w)
    return {"dist": (settled(y), settled(xt.grad), grads(layer)), "ref": (ref_y[:, mine], ref_dx[:, mine], ref_grads)}


def check_ddp(rank: int, mesh) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model, ref = make_model(), make_model()
    ref.load_state_dict(model.state_dict())
    x, w = inputs()
    mine = slice(2 * rank, 2 * rank + 2)
    ddp = DistributedDataParallel(model)
    xt = x[mine].clone().requires_grad_()
    y = ddp(xt)
    (y * w[mine]).sum().backward()  # DDP averages over ranks: the reference divides by WORLD
    ref_y, ref_dx, ref_grads = single_process(ref, x, w, 1 / WORLD)
    return {"dist": (settled(y), settled(xt.grad), grads(ddp)), "ref": (ref_y[mine], ref_dx[mine] * WORLD, ref_grads)}


def fsdp_step(model: nn.Module, rank: int, x: torch.Tensor, w: torch.Tensor):
    mine = slice(2 * rank, 2 * rank + 2)
    xt = x[mine].clone().requires_grad_()
    y = model(xt)
    (y * w[mine]).sum().backward()
    return settled(y), settled(xt.grad), grads(model)


def check_fsdp2(rank: int, mesh) -> dict:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model, ref = make_model(), make_model()
    ref.load_state_dict(model.state_dict())
    x, w = inputs()
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ref_y, ref_dx, ref_grads = single_process(ref, x, w, 1 / WORLD)
    mine = slice(2 * rank, 2 * rank + 2)
    return {"dist": fsdp_step(model, rank, x, w), "ref": (ref_y[mine], ref_dx[mine] * WORLD, ref_grads)}


def check_fsdp2_meta_init(rank: int, mesh) -> dict:
    """Build on meta, shard, materialise (to_empty + reset_parameters), check the init, then load
    the reference weights (full state dict) and compare a step with one process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = make_model("meta")
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    torch.manual_seed(rank)
    for block in model:
        block.reset_parameters()
    init = {n: full(p).detach().clone() for n, p in model.named_parameters()}

    torch.manual_seed(0)
    ref = make_model()
    set_model_state_dict(model, ref.state_dict(), options=StateDictOptions(full_state_dict=True))
    x, w = inputs()
    ref_y, ref_dx, ref_grads = single_process(ref, x, w, 1 / WORLD)
    mine = slice(2 * rank, 2 * rank + 2)
    return {"init": init, "dist": fsdp_step(model, rank, x, w), "ref": (ref_y[mine], ref_dx[mine] * WORLD, ref_grads)}


CHECKS: dict[str, Callable] = {
    "tensor_parallel": check_tensor_parallel,
    "sequence_parallel": check_sequence_parallel,
    "ddp": check_ddp,
    "fsdp2": check_fsdp2,
    "fsdp2_meta_init": check_fsdp2_meta_init,
}


def _worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {}
        for name, check in CHECKS.items():
            try:
                results[name] = check(rank, mesh)
            except Exception:  # recorded: the test of this check fails with it, the others still run
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
        torch.save(results, Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    with _env(TRITON_INTERPRET="0", OMP_NUM_THREADS="1"):
        mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def result(results: list[dict], name: str, rank: int) -> dict:
    res = results[rank][name]
    if "error" in res:
        pytest.fail(f"{name} raised on rank {rank}:\n{res['error']}")
    return res


def assert_matches(res: dict, what: str) -> None:
    (y, dx, g), (ref_y, ref_dx, ref_g) = res["dist"], res["ref"]
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} output: {m}")
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} input grad: {m}")
    assert g.keys() == ref_g.keys()
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{what} grad of {name}: {m}")


@pytest.mark.parametrize("rank", range(WORLD))
@pytest.mark.parametrize("name", CHECKS)
def test_two_ranks_equal_one_process(results, name, rank):
    assert_matches(result(results, name, rank), f"{name} (rank {rank})")


def test_tensor_parallel_shards_every_head_parameter(results):
    placements = result(results, "tensor_parallel", 0)["placements"]
    for block in ("0", "1"):
        for name in ("k", "u", "v", "router", "w_in.weight"):
            assert placements[f"{block}.ffn.{name}"] == "(Shard(dim=0),)", name
        assert placements[f"{block}.ffn.w_out.weight"] == "(Shard(dim=1),)"
        assert placements[f"{block}.norm.weight"] == "not a DTensor"  # outside the plan
    assert placements["0.ffn.head_norm.weight"] == "(Shard(dim=0),)"


def test_tensor_parallel_refuses_what_it_cannot_split(results):
    kv_heads, mixed = result(results, "tensor_parallel", 0)["refused"]
    assert kv_heads == "n_kv_heads: expected a multiple of the mesh size 2, got 1"
    assert mixed is not None and mixed.startswith("u: expected Shard(0) on mesh dim 0 (q: Shard(dim=1)), got Repl")


def test_meta_init_materialises_the_layer_init(results):
    init = result(results, "fsdp2_meta_init", 0)["init"]
    for block in ("0", "1"):
        for name in ("k", "u", "v", "router"):
            std = init[f"{block}.ffn.{name}"].std().item()
            assert 0.012 < std < 0.028, (name, std)  # INIT_STD 0.02: neither garbage nor zeros
        w_in = init[f"{block}.ffn.w_in.weight"]
        bound = fm.layer.PROJ_GAIN * (6 / (2 * D_MODEL)) ** 0.5  # xavier-uniform
        assert w_in.abs().max() <= bound and w_in.std() > bound / 3
        assert torch.equal(init[f"{block}.norm.weight"], torch.ones(D_MODEL))
    assert torch.equal(init["0.ffn.head_norm.weight"], torch.ones(HEADS, D_MODEL // HEADS))


def test_head_parallel_plan_needs_flashmhf_layers():
    from flashmhf_runtime.parallel import head_parallel_plan

    with pytest.raises(ValueError, match="model: expected a module containing FlashMHF layers, got Linear"):
        head_parallel_plan(nn.Linear(2, 2))
    model = make_model()
    assert list(head_parallel_plan(model)) == ["0.ffn", "1.ffn"]
