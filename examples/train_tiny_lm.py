"""Train a tiny byte-level Llama-style LM whose FFNs are FlashMHF layers.

The data is the Python standard library's own source (found next to the ``os`` module; nothing is
downloaded), read as bytes (vocabulary 256). Blocks are pre-norm: RMSNorm -> causal attention with
rotary positions (F.scaled_dot_product_attention) -> RMSNorm -> FlashMHF. Training is deterministic
given ``--seed`` (up to the nondeterminism of the GPU kernels themselves).

    python examples/train_tiny_lm.py --steps 300                 # core = fm.flash_mhf (Triton on CUDA)
    python examples/train_tiny_lm.py --steps 300 --reference     # core = the plain-PyTorch reference
    python examples/train_tiny_lm.py --steps 3 --device cpu --d-model 32 --heads 2 --d-ff 32 --seq 16

``--dtype bf16`` (the default on CUDA) is autocast to bf16 with fp32 parameters and optimizer state;
the Triton path and ``--reference`` follow the same policy, so their loss curves are comparable.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import flashmhf_runtime as fm
from flashmhf_runtime import reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------- data


def stdlib_root() -> Path:
    return Path(os.__file__).resolve().parent


def load_corpus(max_bytes: int) -> torch.Tensor:
    """The first ``max_bytes`` bytes of the stdlib's .py files in sorted path order (uint8)."""
    root = stdlib_root()
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Third-party packages may live under the stdlib directory: skip them (and caches).
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        paths += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    chunks, total = [], 0
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    blob = b"".join(chunks)[:max_bytes]
    if len(blob) < 4096:
        raise RuntimeError(f"found only {len(blob)} bytes of Python source under {root}")
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


class Batches:
    """Random windows of the corpus, drawn from a seeded generator (same batches on every device)."""

    def __init__(self, data: torch.Tensor, batch: int, seq: int, seed: int, device: torch.device):
        if len(data) <= seq + 1:
            raise ValueError(f"seq: expected fewer than {len(data) - 1} tokens for this corpus, got {seq}")
        self.data, self.batch, self.seq, self.device = data, batch, seq, device
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.seq - 1, (self.batch,), generator=self.gen)
        rows = torch.stack([self.data[s : s + self.seq + 1] for s in starts.tolist()]).long()
        rows = rows.to(self.device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]


# ---------------------------------------------------------------------------------------- model


def rotary_tables(seq: int, head_dim: int, device: torch.device, base: float = 10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos(), freqs.sin()  # (seq, head_dim / 2) each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, d). Rotates pairs (x[:d/2], x[d/2:]) as in Llama; computed in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, n_experts: int, head_norm: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=1e-5)
        self.attn = Attention(d_model, n_heads)
        self.ffn_norm = nn.RMSNorm(d_model, eps=1e-5)
        self.ffn = fm.FlashMHF(d_model, n_heads, d_ff, n_experts, head_norm=head_norm)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class TinyLM(nn.Module):
    def __init__(self, layers: int, d_model: int, n_heads: int, d_ff: int, n_experts: int, head_norm: bool):
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, n_experts, head_norm) for _ in range(layers))
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.head = nn.Linear(d_model, 256, bias=False)
        self.head_dim = d_model // n_heads
        # Llama-style init for everything but the FlashMHF layers (which keep the authors' init).
        for name, p in self.named_parameters():
            if ".ffn." not in name and p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary_tables(tokens.shape[1], self.head_dim, tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def reference_core(q, k, u, v, r, precision: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference core computed in fp32 (what the kernels approximate: fp32 accumulation), or in
    ``precision``; the result comes back in q's dtype."""
    with torch.autocast(q.device.type, enabled=False):
        s = reference.flash_mhf(*(t.to(precision) for t in (q, k, u, v, r)))
    return s.to(q.dtype)


def use_reference_core(model: nn.Module, precision: torch.dtype = torch.float32) -> None:
    core = functools.partial(reference_core, precision=precision)
    for m in model.modules():
        if isinstance(m, fm.FlashMHF):
            m.core_fn = core


# ------------------------------------------------------------------------------------- training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="autocast dtype (auto: bf16 on CUDA)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--reference", action="store_true", help="core = reference.flash_mhf instead of fm.flash_mhf")
    p.add_argument("--reference-precision", choices=["fp32", "fp64"], default="fp32",
                   help="what the --reference core computes in (fp64: the same maths, rounded differently)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--head-norm", action="store_true")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: steps // 10, ≤ 30)")
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--json", default=None, help="write {args, losses: [[step, loss]...], ...} here")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def lr_at(step: int, args: argparse.Namespace) -> float:
    warmup = args.warmup if args.warmup is not None else min(30, args.steps // 10)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW with weight decay 0.1 on matrices only, betas (0.9, 0.95)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, loss_of, x: torch.Tensor, y: torch.Tensor,
               lr: float) -> torch.Tensor:
    """One optimizer step at learning rate ``lr`` on ``loss_of(x, y)`` (gradients clipped to norm 1)."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = loss_of(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def train(args: argparse.Namespace) -> dict:
    """Train and return {"losses": [[step, loss], ...], "val_loss", "time_s", ...}."""
    device = torch.device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = DTYPES[dtype_name]
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    data = load_corpus(args.max_bytes)
    split = int(len(data) * 0.9)
    torch.manual_seed(args.seed)
    model = TinyLM(args.layers, args.d_model, args.heads, args.d_ff, args.experts, args.head_norm).to(device)
    if args.reference:
        use_reference_core(model, torch.float64 if args.reference_precision == "fp64" else torch.float32)
    opt = adamw(model, args.lr)
    batches = Batches(data[:split], args.batch, args.seq, args.seed, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)

    def loss_of(x, y):
        with autocast:
            logits = model(x)
        return F.cross_entropy(logits.float().view(-1, 256), y.reshape(-1))

    say(
        f"tiny LM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {len(data) / 1e6:.1f} MB of "
        f"stdlib source, core={'reference' if args.reference else 'fm.flash_mhf'}, {dtype_name}, {device}"
    )
    # Logged loss: the mean over the steps since the previous log (one batch's loss is noisy), summed
    # on the device so that logging does not synchronise every step.
    losses, t0 = [], time.perf_counter()
    window_sum, window_n = torch.zeros((), device=device), 0
    for step in range(args.steps):
        loss = train_step(model, opt, loss_of, *batches.next(), lr_at(step, args))
        window_sum += loss.detach().float()
        window_n += 1
        if step % args.log_every == 0 or step == args.steps - 1:
            value = window_sum.item() / window_n
            window_sum.zero_()
            window_n = 0
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {step}")
            losses.append([step, value])
            say(f"step {step:5d}  loss {value:.4f}  ({time.perf_counter() - t0:.1f}s)")
    train_s = time.perf_counter() - t0

    val = Batches(data[split:], args.batch, args.seq, args.seed + 1, device)
    model.eval()
    with torch.no_grad():
        val_loss = sum(loss_of(*val.next()).item() for _ in range(4)) / 4
    say(f"val loss {val_loss:.4f}  ({train_s:.1f}s training)")
    result = {"args": vars(args), "dtype": dtype_name, "losses": losses, "val_loss": val_loss, "time_s": train_s}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
