"""Write tiny random checkpoints in the upstream formats, so tests exercise the real loading code."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io_utils import atomic_save_safetensors, atomic_write_json


def _init_(module: torch.nn.Module, seed: int) -> None:
    """Random weights large enough that bugs show up in the logits (HF's default init is tiny)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def tiny_llama(*, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int | None = None,
               d_mlp: int = 128, vocab_size: int = 512, seed: int = 0, rope_theta: float = 500000.0):
    """A random transformers Llama of the given size: the architecture of LLaDA and of our AR twin."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                         num_key_value_heads=n_kv_heads or n_heads, intermediate_size=d_mlp, vocab_size=vocab_size,
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, rms_norm_eps=1e-5,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    module = LlamaForCausalLM(config)
    _init_(module, seed)
    return module.eval()


def write_tiny_llada(folder: str | Path, *, mask_id: int | None = None, tokenizer=None, seed: int = 0, **size) -> Path:
    """A LLaDA checkpoint folder (LLaDA config fields and key names) with random weights."""
    from .llada import save_llada

    module = tiny_llama(seed=seed, **size)
    vocab = module.config.vocab_size
    return save_llada(module, folder, mask_id=vocab - 1 if mask_id is None else mask_id, tokenizer=tokenizer)


def write_tiny_causal(folder: str | Path, *, tokenizer=None, seed: int = 0, **size) -> Path:
    """A standard transformers Llama checkpoint folder (the autoregressive baseline format)."""
    module = tiny_llama(seed=seed, **size)
    folder = Path(folder)
    module.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def write_tiny_dream(folder: str | Path, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                     n_kv_heads: int = 2, d_mlp: int = 128, vocab_size: int = 512, mask_id: int | None = None,
                     tokenizer=None, seed: int = 0) -> Path:
    """A Dream checkpoint folder (Qwen2 layout with q/k/v biases, Dream's config) with random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                         num_key_value_heads=n_kv_heads, intermediate_size=d_mlp, vocab_size=vocab_size,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    module = Qwen2ForCausalLM(config)
    _init_(module, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mask_id = vocab_size - 1 if mask_id is None else mask_id
    atomic_save_safetensors(folder / "model.safetensors", module.state_dict(), metadata={"format": "pt"})
    atomic_write_json(folder / "config.json", {
        "model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": d_model,
        "intermediate_size": d_mlp, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads, "vocab_size": vocab_size, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "use_sliding_window": False, "attention_dropout": 0.0,
        "mask_token_id": mask_id, "pad_token_id": mask_id - 1, "eos_token_id": mask_id - 1,
        "bos_token_id": mask_id - 1, "torch_dtype": "float32",
    })
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def _released(config: dict, family: str) -> dict:
    """config.json as the released folders ship it: no mask id, no block size, pad = EOS = the released EOS id."""
    from ..errors import DLMScopeError
    from .families import FAMILIES

    ids = FAMILIES[family].released_ids
    eos = ids["eos"]
    if config["vocab_size"] <= ids["mask"]:
        raise DLMScopeError(f"released=True needs vocab_size > {ids['mask']} (the released mask id); "
                            f"got {config['vocab_size']}")
    config = {k: v for k, v in config.items() if k not in ("mask_token_id", "block_size")}
    return {**config, "pad_token_id": eos, "eos_token_id": eos}


def _write_moe(folder: str | Path, module: torch.nn.Module, config: dict, tokenizer, seed: int) -> Path:
    """Random weights (router expert biases included) saved under upstream keys next to `config`."""
    _init_(module, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name.endswith("expert_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    atomic_save_safetensors(folder / "model.safetensors", state, metadata={"format": "pt"})
    atomic_write_json(folder / "config.json", config)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def write_tiny_lladamoe(folder: str | Path, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                        n_kv_heads: int = 2, n_experts: int = 8, n_active: int = 2, d_expert: int = 32,
                        d_shared: int | None = 64, vocab_size: int = 512, mask_id: int | None = None,
                        tokenizer=None, seed: int = 0, released: bool = False) -> Path:
    """A LLaDA-MoE checkpoint folder (the released config's fields and keys, `model_type` "llada" with
    `LLaDAMoEModelLM`), random weights; every layer MoE, QK norm, expert bias on. `released`: config.json
    declares no mask id, as the released folders (the vocabulary must hold the released ids)."""
    from .lladamoe import build

    mask_id = vocab_size - 1 if mask_id is None else mask_id
    config = {
        "model_type": "llada", "architectures": ["LLaDAMoEModelLM"], "vocab_size": vocab_size,
        "hidden_size": d_model, "dense_intermediate_size": 4 * d_model, "expert_intermediate_size": d_expert,
        "shared_expert_intermediate_size": d_shared, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads, "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 50000.0, "partial_rotary_factor": 1.0,
        "attention_bias": False, "clip_qkv": None, "num_experts": n_experts, "num_experts_per_tok": n_active,
        "norm_topk_prob": False, "qk_layernorm": True, "moe_layer_freq": [1] * n_layers,
        "moe_router_enable_expert_bias": True, "moe_router_score_function": "softmax", "routed_scaling_factor": 1,
        "router_num_group": -2, "router_topk_group": -2, "tie_word_embeddings": False, "use_cache": False,
        "mask_token_id": mask_id, "pad_token_id": mask_id - 1, "eos_token_id": mask_id - 1, "bos_token_id": None,
        "torch_dtype": "float32",
    }
    config = _released(config, "lladamoe") if released else config
    return _write_moe(folder, build(config, device="cpu"), config, tokenizer, seed)


def write_tiny_llada2(folder: str | Path, *, d_model: int = 64, n_layers: int = 3, n_heads: int = 4,
                      n_kv_heads: int = 2, head_dim: int = 32, n_experts: int = 8, n_active: int = 2,
                      n_group: int = 4, topk_group: int = 2, d_expert: int = 32, n_shared: int = 1,
                      first_dense: int = 1, block_size: int = 4, vocab_size: int = 512, mask_id: int | None = None,
                      tokenizer=None, seed: int = 0, released: bool = False) -> Path:
    """A LLaDA 2.x checkpoint folder (`llada2_moe` fields and keys), random weights: grouped routing,
    shared experts, `first_dense` dense layers, a head_dim that is not d_model / n_heads, partial RoPE.
    `released`: config.json declares no mask id and no block size, as the released folders (the block
    length is then upstream's default, 32)."""
    from .llada2 import build

    mask_id = vocab_size - 1 if mask_id is None else mask_id
    config = {
        "model_type": "llada2_moe", "architectures": ["LLaDA2MoeModelLM"], "vocab_size": vocab_size,
        "hidden_size": d_model, "intermediate_size": 4 * d_model, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "head_dim": head_dim,
        "hidden_act": "silu", "use_qkv_bias": True, "use_qk_norm": True, "use_bias": True, "rms_norm_eps": 1e-6,
        "norm_head": False, "tie_word_embeddings": False, "max_position_embeddings": 4096, "rope_theta": 600000.0,
        "partial_rotary_factor": 0.5, "num_experts": n_experts, "num_shared_experts": n_shared,
        "num_experts_per_tok": n_active, "n_group": n_group, "topk_group": topk_group, "routed_scaling_factor": 2.5,
        "moe_intermediate_size": d_expert, "first_k_dense_replace": first_dense, "block_size": block_size,
        "embedding_dropout": 0.0, "attention_dropout": 0.0, "output_dropout": 0.0, "use_cache": False,
        "use_sliding_window": False, "mask_token_id": mask_id, "pad_token_id": mask_id - 1,
        "eos_token_id": mask_id - 1, "torch_dtype": "float32",
    }
    config = _released(config, "llada2") if released else config
    return _write_moe(folder, build(config, device="cpu"), config, tokenizer, seed)
