"""FlashMHF in a Hugging Face transformers Llama (tiny config: 2 layers, hidden 128; nothing downloaded).

The core runs under Triton's interpreter here (conftest sets TRITON_INTERPRET=1), so every forward
of these models goes through the generated kernels: token counts are kept small.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import flashmhf_runtime as fm
from flashmhf_runtime.checkpoint import to_authors_state_dict
from flashmhf_runtime.transformers import (
    find_mlps,
    from_pretrained,
    llama_config_from_authors,
    load_authors_checkpoint,
    replace_mlp,
)

LLAMA = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
FLASH = dict(n_heads=4, n_experts=4, n_kv_heads=2, head_norm=True)


def tiny_llama(seed: int = 0, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, **config}))


def tiny_flash_llama(seed: int = 0, **config) -> LlamaForCausalLM:
    model = replace_mlp(tiny_llama(seed, **config), **FLASH)
    with torch.no_grad():  # trained-looking head norms, so a dropped one would show
        for layer in flash_layers(model):
            layer.head_norm.weight.uniform_(0.5, 1.5)
    return model


def flash_layers(model) -> list[fm.FlashMHF]:
    return [m for m in model.modules() if isinstance(m, fm.FlashMHF)]


def tokens(batch: int = 2, seq: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, LLAMA["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_replace_mlp_swaps_every_mlp_and_records_the_settings():
    model = tiny_llama()
    assert len(find_mlps(model)) == 2
    out = replace_mlp(model, n_heads=4, n_experts=4)
    assert out is model and find_mlps(model) == []
    layers = flash_layers(model)
    assert [model.model.layers[i].mlp for i in range(2)] == layers
    for layer in layers:  # the MLP's width and intermediate size, the Llama's dtype and device
        assert (layer.d_model, layer.d_ff, layer.n_heads, layer.n_kv_heads, layer.head_norm) == (128, 256, 4, 4, None)
        assert layer.k.dtype == torch.float32 and layer.k.device.type == "cpu"
    assert model.config.flashmhf == dict(n_heads=4, n_experts=4, n_kv_heads=None, head_norm=False, d_ff=None)
    assert json.loads(model.config.to_json_string())["flashmhf"]["n_heads"] == 4

    sized = replace_mlp(tiny_llama(), n_heads=2, n_experts=3, d_ff=96, n_kv_heads=1, head_norm=True)
    layer = flash_layers(sized)[0]
    assert (layer.d_ff, layer.expert_dim, layer.n_kv_heads, layer.head_norm is not None) == (96, 32, 1, True)
    with pytest.raises(ValueError, match="model: expected modules with gate_proj/up_proj/down_proj"):
        replace_mlp(model, n_heads=4, n_experts=4)  # nothing left to replace
    with pytest.raises(ValueError, match="n_experts: expected a divisor of d_ff=256, got 3"):
        replace_mlp(tiny_llama(), n_heads=4, n_experts=3)


def test_training_reaches_every_flashmhf_parameter_and_runs_the_op():
    model = tiny_flash_llama()
    x = tokens()
    out = model(x, labels=x)
    out.loss.backward()
    for i, layer in enumerate(flash_layers(model)):
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"layer {i} {name}"
    with torch.no_grad():  # the same model with the reference core: fm.flash_mhf is what ran
        for layer in flash_layers(model):
            layer.core_fn = fm.reference.flash_mhf
        torch.testing.assert_close(model(x).logits, out.logits.detach(), rtol=1e-4, atol=1e-4)


def test_generate_with_kv_cache_equals_without():
    model = tiny_flash_llama().eval()
    prompt, mask = tokens(seq=4), torch.ones(2, 4, dtype=torch.long)
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kw)
    assert cached.shape == (2, 7) and torch.equal(cached[:, :4], prompt)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kw))


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_from_pretrained_gives_identical_logits(tmp_path, tied):
    model = tiny_flash_llama(tie_word_embeddings=tied).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["flashmhf"] == {**FLASH, "d_ff": None}
    loaded = from_pretrained(tmp_path)
    assert len(flash_layers(loaded)) == 2 and not loaded.training
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_from_pretrained_in_bf16(tmp_path):
    model = tiny_flash_llama().eval()
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32  # computed in fp32, as transformers does
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
        assert (loaded(x).logits.float() - ref).norm() < 3e-2 * ref.norm()


def test_from_pretrained_refuses_a_model_without_flashmhf(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="path: expected a model saved after replace_mlp"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="path: expected a folder with model.safetensors"):
        from flashmhf_runtime.transformers import read_state_dict
        read_state_dict(tmp_path / "nothing")


def test_autocast_bf16_takes_the_hidden_states_dtype():
    model = tiny_flash_llama()
    x = tokens()
    with torch.no_grad():
        fp32 = model(x, labels=x).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert abs(out.loss.item() - fp32.item()) < 2e-2 * fp32.item()
    for layer in flash_layers(model):
        assert layer.k.dtype == torch.float32 and torch.isfinite(layer.k.grad).all() and layer.k.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    x = tokens()
    grads, calls = [], []
    for checkpointing in (False, True):
        model = tiny_flash_llama().train()
        calls.append(0)
        for layer in flash_layers(model):
            layer.register_forward_pre_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))
        if checkpointing:  # transformers 5 renamed gradient_checkpointing_enable
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert calls == [2, 4]  # checkpointed: each FlashMHF runs again in backward
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def authors_folder(model: LlamaForCausalLM, path, **config) -> None:
    """``model`` written as the authors' MHFFNMoEForCausalLM checkpoint: their config.json and keys."""
    state = {k: t for k, t in model.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(model.model.layers):
        state.update(to_authors_state_dict(layer.mlp, f"model.layers.{i}.mlp."))
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file({k: t.contiguous() for k, t in state.items()}, path / "model.safetensors")
    authors = {**LLAMA, "model_type": "mhffnmoe", "architectures": ["MHFFNMoEForCausalLM"], "hidden_act": "silu",
               "tie_word_embeddings": model.config.tie_word_embeddings, "mhffnmoe_num_heads": FLASH["n_heads"],
               "mhffnmoe_num_kuv_heads": FLASH["n_kv_heads"], "mhffnmoe_num_experts": FLASH["n_experts"],
               "mhffnmoe_apply_rmsnorm": FLASH["head_norm"], "mhffnmoe_skip_linear": False,
               "mhffnmoe_apply_dot_scaling": False, "mhffnmoe_apply_final_scaling": False, "mlp_bias": False,
               **config}
    (path / "config.json").write_text(json.dumps(authors))


@pytest.mark.parametrize("tied", [False, True])
def test_load_authors_checkpoint_gives_the_same_model(tmp_path, tied):
    model = tiny_flash_llama(tie_word_embeddings=tied).eval()
    authors_folder(model, tmp_path)
    loaded = load_authors_checkpoint(tmp_path)
    assert isinstance(loaded, LlamaForCausalLM) and loaded.config.flashmhf == {**FLASH, "d_ff": 256}
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_authors_config_settings_flashmhf_does_not_compute_are_refused():
    base = {**LLAMA, "mhffnmoe_num_heads": 4, "mhffnmoe_num_experts": 4}
    config, settings = llama_config_from_authors(base)
    assert config.hidden_size == 128 and settings == dict(n_heads=4, n_experts=4, n_kv_heads=None, head_norm=False,
                                                          d_ff=256)
    with pytest.raises(ValueError, match=r"config\['mhffnmoe_apply_dot_scaling'\]: expected False"):
        llama_config_from_authors({**base, "mhffnmoe_apply_dot_scaling": True})
    with pytest.raises(ValueError, match=r"config\['rms_norm_eps'\]: expected 1e-05"):
        llama_config_from_authors({**base, "mhffnmoe_apply_rmsnorm": True, "rms_norm_eps": 1e-6})
    with pytest.raises(ValueError, match="config: expected the authors' MHFFNMoE config"):
        llama_config_from_authors(LLAMA)


def test_the_runtime_imports_without_transformers():
    """transformers is an optional extra: the runtime must neither import nor need it."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # an import of it raises ImportError
        "import flashmhf_runtime, flashmhf_runtime.parallel\n"
        "try:\n    import flashmhf_runtime.transformers\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'flashmhf[hf]'" in out
