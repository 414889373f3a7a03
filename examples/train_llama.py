"""Train a small transformers Llama with FlashMHF MLPs next to the same Llama with SwiGLU MLPs.

Both models are a byte-level ``LlamaForCausalLM`` (vocabulary 256) trained on the Python standard
library's own source (nothing is downloaded; data, optimizer step and cosine schedule come from
train_tiny_lm.py). The FlashMHF model is built with ``flashmhf_runtime.transformers.replace_mlp``; the
SwiGLU model's intermediate size is chosen so that both have the same parameter count. Same seed,
same batches, same optimizer. Prints tokens/s and peak memory of each, writes a JSON of the results
(``--out``) and a loss-curve PNG (``--plot``, needs matplotlib: ``pip install 'flashmhf[examples]'``).

    python examples/train_llama.py --steps 300 --out llama.json --plot llama.png       # GPU defaults
    python examples/train_llama.py --tiny --steps 20 --out tiny.json --plot tiny.png   # a CPU-sized model
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import flashmhf_runtime as fm
from flashmhf_runtime.transformers import replace_mlp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_lm import DTYPES, Batches, adamw, load_corpus, lr_at, train_step  # noqa: E402  (same recipe)

VOCAB = 256
MODELS = ("flashmhf", "swiglu")
# --tiny: a model that trains in seconds per step on a CPU.
TINY = dict(layers=2, d_model=64, heads=2, ffn_heads=2, d_ff=128, experts=2, batch=4, seq=64, max_bytes=300_000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tiny", action="store_true", help=f"CPU-sized model and batch: {TINY} (explicit flags win)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="autocast dtype (auto: bf16 on CUDA)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12, help="attention heads")
    p.add_argument("--ffn-heads", type=int, default=6, help="FlashMHF heads (d_h = d_model / ffn_heads)")
    p.add_argument("--d-ff", type=int, default=2048, help="FlashMHF intermediate size per head")
    p.add_argument("--experts", type=int, default=8, help="FlashMHF sub-networks per head")
    p.add_argument("--head-norm", action="store_true", help="FlashMHF per-head RMSNorm of q")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: steps // 10, ≤ 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bytes", type=int, default=20_000_000)
    p.add_argument("--log-every", type=int, default=10, help="steps per recorded loss (mean over them)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write the loss curves as PNG here (needs matplotlib)")
    args = p.parse_args(argv)
    if args.tiny:  # TINY's values, except where a flag was given
        given = {a.split("=")[0][2:].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
                 if a.startswith("--")}
        for key, value in TINY.items():
            if key not in given:
                setattr(args, key, value)
    models = args.models.split(",")
    if not models or any(m not in MODELS for m in models):
        p.error(f"--models: expected a comma-separated subset of {','.join(MODELS)}, got {args.models!r}")
    args.models = models
    if args.steps < 1:
        p.error(f"--steps: expected at least 1, got {args.steps}")
    return args


# ----------------------------------------------------------------------------------------- models


def llama_config(args: argparse.Namespace, intermediate_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.d_model, intermediate_size=intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.seq, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def flashmhf_mlp_params(args: argparse.Namespace) -> int:
    """Parameters of one FlashMHF MLP: W_in, W_out, K/U/V, router (and head norm)."""
    layer = fm.FlashMHF(args.d_model, args.ffn_heads, args.d_ff, args.experts, head_norm=args.head_norm, device="meta")
    return sum(p.numel() for p in layer.parameters())


def swiglu_size(args: argparse.Namespace) -> int:
    """The SwiGLU intermediate size (a multiple of 8) whose 3·d·size parameters match a FlashMHF MLP."""
    return max(8, 8 * round(flashmhf_mlp_params(args) / (3 * args.d_model) / 8))


def build(kind: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    torch.manual_seed(args.seed)
    if kind == "swiglu":
        return LlamaForCausalLM(llama_config(args, swiglu_size(args))).to(device)
    model = LlamaForCausalLM(llama_config(args, args.d_ff)).to(device)
    return replace_mlp(model, n_heads=args.ffn_heads, n_experts=args.experts, head_norm=args.head_norm)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------- training


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(kind: str, args: argparse.Namespace, data: torch.Tensor, device: torch.device, amp_dtype: torch.dtype,
              progress: Progress) -> dict:
    """Train one model; return its parameter count, losses, validation loss, tokens/s and peak memory."""
    split = int(len(data) * 0.9)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(kind, args, device).train()
    opt = adamw(model, args.lr)
    batches = Batches(data[:split], args.batch, args.seq, args.seed, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, VOCAB), y.reshape(-1))

    # Throughput leaves out the first steps (kernel compilation, autotuning, allocator warm-up).
    timed_from = min(10, args.steps // 10)
    task = progress.add_task(kind, total=args.steps, loss=float("nan"))
    losses, window, t_start = [], [], None
    for step in range(args.steps):
        if step == timed_from:
            sync(device)
            t_start = time.perf_counter()
        loss = train_step(model, opt, loss_of, *batches.next(), lr_at(step, args))
        window.append(loss.detach())
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            value = torch.stack(window).float().mean().item()
            if not math.isfinite(value):
                raise FloatingPointError(f"{kind}: loss is {value} at step {step}")
            losses.append([step, value])
            window = []
            progress.update(task, loss=value)
        progress.advance(task)
    sync(device)
    seconds = time.perf_counter() - t_start
    tokens_per_s = (args.steps - timed_from) * args.batch * args.seq / seconds
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    model.eval()
    val = Batches(data[split:], args.batch, args.seq, args.seed + 1, device)
    with torch.no_grad():
        val_loss = sum(loss_of(*val.next()).item() for _ in range(2)) / 2
    return {"params": param_count(model), "losses": losses, "val_loss": val_loss, "tokens_per_s": tokens_per_s,
            "peak_memory_mib": peak_mib, "timed_steps": args.steps - timed_from, "time_s": seconds}


def plot(results: dict, path: str, title: str) -> bool:
    """The loss curves as a PNG at ``path``; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, res in results.items():
        steps, losses = zip(*res["losses"])
        ax.plot(steps, losses, label=f"{kind} ({res['params'] / 1e6:.2f}M params, val {res['val_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    console = Console(stderr=True)
    data = load_corpus(args.max_bytes)
    console.print(f"{len(data) / 1e6:.1f} MB of stdlib source, {dtype_name} on {device}; FlashMHF "
                  f"{args.ffn_heads} heads x {args.experts} experts, d_ff {args.d_ff}; SwiGLU intermediate "
                  f"{swiglu_size(args)} (same parameter count)")
    columns = (TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn())
    results = {}
    with Progress(*columns, console=console) as progress:
        for kind in args.models:
            results[kind] = train_one(kind, args, data, device, DTYPES[dtype_name], progress)
    for kind, res in results.items():
        peak = f"{res['peak_memory_mib']:.0f} MiB" if res["peak_memory_mib"] is not None else "n/a (CPU)"
        console.print(f"{kind:>8}: {res['params'] / 1e6:.2f}M params, {res['tokens_per_s']:,.0f} tokens/s, "
                      f"peak memory {peak}, final loss {res['losses'][-1][1]:.4f}, val loss {res['val_loss']:.4f}")
    report = {
        "args": vars(args), "dtype": dtype_name, "swiglu_intermediate_size": swiglu_size(args),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__, "models": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        console.print(f"results: {args.out}")
    if args.plot:
        title = f"Llama, {args.layers} layers, d_model {args.d_model}, {args.batch}x{args.seq} tokens/step ({device})"
        if plot(results, args.plot, title):
            console.print(f"loss curves: {args.plot}")
        else:
            console.print("no plot: matplotlib is not installed (pip install 'flashmhf[examples]')")
    return report


if __name__ == "__main__":
    main()
