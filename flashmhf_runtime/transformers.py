"""FlashMHF in Hugging Face transformers models (needs the ``hf`` extra: ``pip install flashmhf[hf]``).

    from transformers import LlamaConfig, LlamaForCausalLM
    from flashmhf_runtime.transformers import from_pretrained, replace_mlp

    model = replace_mlp(LlamaForCausalLM(config), n_heads=8, n_experts=4)   # FFNs -> FlashMHF
    model.save_pretrained("out")                                          # settings go in config.json
    model = from_pretrained("out")

``load_authors_checkpoint`` reads a checkpoint of the authors' own ``MHFFNMoEForCausalLM`` (a Llama
whose MLPs are their ``MHFFNMoEMultiHeadFFNFlash``) into a transformers Llama with FlashMHF MLPs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from flashmhf_runtime.checkpoint import AUTHORS_KEYS, load_authors_state_dict
from flashmhf_runtime.layer import HEAD_NORM_EPS, FlashMHF

try:
    import transformers
except ImportError as e:  # the runtime itself never imports this module
    raise ImportError(
        "flashmhf_runtime.transformers needs Hugging Face transformers: pip install 'flashmhf[hf]'"
    ) from e

CONFIG_KEY = "flashmhf"  # model.config.flashmhf: the replace_mlp settings, saved in config.json
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def find_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every gated MLP in ``model``: a module whose ``gate_proj``, ``up_proj`` and
    ``down_proj`` are nn.Linear (Llama, Mistral, Qwen2, Gemma, ... name them so)."""
    return [
        (name, m) for name, m in model.named_modules()
        if all(isinstance(getattr(m, p, None), nn.Linear) for p in MLP_PROJECTIONS)
    ]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def replace_mlp(
    model: nn.Module,
    *,
    n_heads: int,
    n_experts: int,
    n_kv_heads: int | None = None,
    head_norm: bool = False,
    d_ff: int | None = None,
) -> nn.Module:
    """Swap every gated MLP of ``model`` (see ``find_mlps``) for a freshly initialised ``FlashMHF``
    of the MLP's width, on its device and in its dtype; ``d_ff`` defaults to the MLP's intermediate
    size. The settings are recorded in ``model.config.flashmhf`` (when the model has a config) so that
    ``save_pretrained`` keeps them and ``from_pretrained`` rebuilds the layers. Returns ``model``."""
    mlps = find_mlps(model)
    if not mlps:
        raise ValueError(
            f"model: expected modules with gate_proj/up_proj/down_proj nn.Linear (a Llama-family MLP), "
            f"got none in {type(model).__name__}"
        )
    settings = {"n_heads": n_heads, "n_experts": n_experts, "n_kv_heads": n_kv_heads, "head_norm": head_norm,
                "d_ff": d_ff}
    for name, mlp in mlps:
        gate, down = mlp.gate_proj, mlp.down_proj
        if down.out_features != gate.in_features:
            raise ValueError(
                f"{name}.down_proj: expected out_features = gate_proj.in_features = {gate.in_features}, "
                f"got {down.out_features}"
            )
        layer = FlashMHF(gate.in_features, n_heads, d_ff or gate.out_features, n_experts, n_kv_heads=n_kv_heads,
                         head_norm=head_norm, device=gate.weight.device, dtype=gate.weight.dtype)
        _set_submodule(model, name, layer)
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, settings)
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a saved model folder: ``model.safetensors``, its sharded form
    (``model.safetensors.index.json``), or ``pytorch_model.bin`` (read with weights_only)."""
    from safetensors.torch import load_file

    folder = Path(path)
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(folder / shard))
        return state
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(
        f"path: expected a folder with model.safetensors, model.safetensors.index.json or pytorch_model.bin, "
        f"got {str(path)!r} without any"
    )


def _load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], ignore_missing: set[str]) -> None:
    """``model.load_state_dict(state)``, strict but for ``ignore_missing`` (loaded elsewhere) and for
    tied weights (save_pretrained writes one name of a shared parameter)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    aliases = {name: names for names in names_of.values() for name in names}
    missing = [k for k in missing if k not in ignore_missing and not any(a in state for a in aliases.get(k, ()))]
    if missing or unexpected:
        raise ValueError(f"state_dict: expected the model's keys, got missing keys {missing}, unexpected {unexpected}")


# The from_config keyword for the parameters' dtype (transformers 5 renamed torch_dtype).
DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def _build(config: transformers.PretrainedConfig, dtype: torch.dtype | None,
           device: torch.device | str | None, **kw) -> nn.Module:
    """The causal LM of ``config`` on ``device``, its parameters in ``dtype`` (None: the config's
    dtype, else fp32); buffers computed in fp32, such as rotary frequencies, stay fp32."""
    if dtype is not None:
        kw[DTYPE_KW] = dtype
    with torch.device(device or "cpu"):
        return transformers.AutoModelForCausalLM.from_config(config, **kw)


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, **kw) -> nn.Module:
    """Load a causal LM saved (``save_pretrained``) after ``replace_mlp``: the architecture is built
    from ``config.json``, its MLPs are replaced with the recorded FlashMHF settings, then the weights
    are loaded. ``dtype``/``device`` place the model (default: the dtype it was saved in, on CPU); ``kw`` go to
    ``AutoModelForCausalLM.from_config`` (e.g. ``attn_implementation``)."""
    config = transformers.AutoConfig.from_pretrained(path)
    settings = getattr(config, CONFIG_KEY, None)
    if not isinstance(settings, dict):
        raise ValueError(f"path: expected a model saved after replace_mlp (config.{CONFIG_KEY} set), "
                         f"got {str(path)!r} without it")
    model = replace_mlp(_build(config, dtype, device, **kw), **settings)
    _load_weights(model, read_state_dict(path), ignore_missing=set())
    return model.eval()


# --------------------------------------------------------------------------- the authors' layout

# Settings of the authors' config that FlashMHF does not compute, with the value it computes.
AUTHORS_FIXED = {
    "mhffnmoe_skip_linear": False,
    "mhffnmoe_apply_dot_scaling": False,
    "mhffnmoe_apply_final_scaling": False,
    "mhffnmoe_disable_original_mlp_rmsnorm": False,
    "mlp_bias": False,
    "hidden_act": "silu",
}
# The Llama fields of the authors' config (their model is a Llama but for the MLP).
LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias", "attention_dropout", "mlp_bias",
    "head_dim", "bos_token_id", "eos_token_id", "pad_token_id",
)


def llama_config_from_authors(authors: Mapping) -> tuple[transformers.LlamaConfig, dict]:
    """The transformers LlamaConfig and the ``replace_mlp`` settings of an authors' ``config.json``
    (model_type "mhffnmoe"). Settings FlashMHF does not compute (dot/final scaling, skipped
    projections, MLP biases, an activation other than SiLU) raise ValueError."""
    if "mhffnmoe_num_heads" not in authors:
        raise ValueError(f"config: expected the authors' MHFFNMoE config (mhffnmoe_* keys), "
                         f"got model_type {authors.get('model_type')!r} without mhffnmoe_num_heads")
    for key, value in AUTHORS_FIXED.items():
        if authors.get(key, value) != value:
            raise ValueError(f"config[{key!r}]: expected {value!r} (what FlashMHF computes), got {authors[key]!r}")
    head_norm = bool(authors.get("mhffnmoe_apply_rmsnorm", False))
    eps = authors.get("rms_norm_eps", 1e-6)
    if head_norm and eps != HEAD_NORM_EPS:
        raise ValueError(f"config['rms_norm_eps']: expected {HEAD_NORM_EPS} (the FlashMHF head norm's eps, "
                         f"which the authors' q_norm takes from it), got {eps}")
    llama = {k: authors[k] for k in LLAMA_FIELDS if k in authors and authors[k] is not None}
    settings = {
        "n_heads": authors["mhffnmoe_num_heads"],
        "n_experts": authors.get("mhffnmoe_num_experts", 1),
        "n_kv_heads": authors.get("mhffnmoe_num_kuv_heads") or None,
        "head_norm": head_norm,
        "d_ff": authors["intermediate_size"],
    }
    return transformers.LlamaConfig(**llama), settings


def load_authors_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                            device: torch.device | str | None = None) -> nn.Module:
    """A transformers ``LlamaForCausalLM`` with FlashMHF MLPs holding the authors' checkpoint in
    folder ``path`` (their ``config.json`` and weights). Their attention, norms and embeddings keep
    Llama's names; each ``model.layers.{i}.mlp.*`` goes through
    ``flashmhf_runtime.checkpoint.load_authors_state_dict``. ``dtype`` (default fp32) and ``device``
    (default CPU) place the model."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"path: expected a folder with config.json, got {str(path)!r}")
    config, settings = llama_config_from_authors(json.loads(config_file.read_text()))
    model = replace_mlp(_build(config, dtype, device), **settings)
    state = read_state_dict(path)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FlashMHF)}
    for name, layer in layers.items():
        load_authors_state_dict(layer, state, f"{name}.")
    authors_keys = {f"{name}.{k}" for name in layers for k in AUTHORS_KEYS}
    flashmhf_params = {f"{name}.{p}" for name, layer in layers.items() for p, _ in layer.named_parameters()}
    _load_weights(model, {k: t for k, t in state.items() if k not in authors_keys}, ignore_missing=flashmhf_params)
    return model.eval()
