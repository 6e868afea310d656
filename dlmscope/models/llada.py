"""LLaDA checkpoints run natively as transformers' Llama with the causal mask removed.

LLaDA is an OLMo-style decoder whose only architectural difference from Llama is bidirectional
attention, so renaming its state-dict keys onto `LlamaForCausalLM` reproduces its logits without
executing the checkpoint's remote code.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .. import checks
from ..errors import DLMScopeError
from .base import LoadedModel
from .checkpoint import build_hf_module, iter_safetensors, load_tokenizer, read_config, wrap_decoder

_LAYER_KEYS = {
    "attn_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)$")


def rename_key(key: str) -> str:
    """LLaDA state-dict key -> transformers Llama key."""
    if m := _BLOCK_RE.match(key):
        layer, part, kind = m.groups()
        if part not in _LAYER_KEYS:
            raise DLMScopeError(f"unexpected LLaDA weight {key!r}")
        return f"model.layers.{layer}.{_LAYER_KEYS[part]}.{kind}"
    fixed = {
        "model.transformer.wte.weight": "model.embed_tokens.weight",
        "model.transformer.ln_f.weight": "model.norm.weight",
        "model.transformer.ff_out.weight": "lm_head.weight",
    }
    if key not in fixed:
        raise DLMScopeError(f"unexpected LLaDA weight {key!r}")
    return fixed[key]


def llama_config(cfg: dict, intermediate_size: int, vocab_size: int):
    from transformers import LlamaConfig

    for name in ("d_model", "n_layers", "n_heads"):
        if name not in cfg:
            raise DLMScopeError(f"LLaDA config.json lacks {name!r}")
    return LlamaConfig(
        hidden_size=cfg["d_model"],
        num_hidden_layers=cfg["n_layers"],
        num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg.get("n_kv_heads") or cfg["n_heads"],
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)},
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        max_position_embeddings=cfg.get("max_sequence_length", 4096),
        tie_word_embeddings=bool(cfg.get("weight_tying", False)),
        attention_bias=bool(cfg.get("include_bias", False) or cfg.get("include_qkv_bias", False)),
        mlp_bias=bool(cfg.get("include_bias", False)),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
    )


def load_llada(folder: Path, device: str | torch.device, dtype: torch.dtype, name: str | None = None,
               device_map: str | dict | None = None) -> LoadedModel:
    from transformers import LlamaForCausalLM

    cfg = read_config(folder)
    tensors = dict(iter_safetensors(folder))
    try:
        wte = tensors["model.transformer.wte.weight"]
        ff = tensors["model.transformer.blocks.0.ff_proj.weight"]
    except KeyError as e:
        raise DLMScopeError(f"{str(folder)!r} does not hold LLaDA weights (missing {e.args[0]!r})") from None
    config = llama_config(cfg, intermediate_size=ff.shape[0], vocab_size=wte.shape[0])
    if config.attention_bias and not cfg.get("include_bias", False):
        # include_qkv_bias: q/k/v biases only; Llama's attention_bias also gives o_proj one, which is zero here
        for i in range(config.num_hidden_layers):
            key = f"model.transformer.blocks.{i}.attn_out.bias"
            tensors.setdefault(key, torch.zeros(config.hidden_size, dtype=wte.dtype))
    if "model.transformer.ff_out.weight" not in tensors and not config.tie_word_embeddings:
        raise DLMScopeError(f"{str(folder)!r}: no LM head (model.transformer.ff_out) and weight_tying is false")
    module = build_hf_module(LlamaForCausalLM, config, iter(tensors.items()), rename_key, device, dtype, device_map)
    mask_id = cfg.get("mask_token_id")
    tokenizer = load_tokenizer(folder)
    if mask_id is None and tokenizer is not None:
        mask_id = tokenizer.mask_token_id
    return wrap_decoder(module, family="llada", name=name or folder.name, tokenizer=tokenizer,
                        mask_id=mask_id, shift=False, causal=False)


def save_llada(module, folder: str | Path, *, mask_id: int, tokenizer=None, extra_config: dict | None = None) -> Path:
    """Write a transformers Llama module as a LLaDA checkpoint folder (config fields and key names).

    The inverse of `load_llada`: what we train or build is stored exactly the way LLaDA-8B ships,
    so it goes through the same loading code as the real model.
    """
    from ..io_utils import atomic_save_safetensors, atomic_write_json

    folder = Path(folder)
    c = module.config
    inverse = {v: k for k, v in _LAYER_KEYS.items()}
    tensors = {}
    qkv_bias_only = bool(c.attention_bias and not c.mlp_bias)
    for key, value in module.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if qkv_bias_only and key.endswith("self_attn.o_proj.bias"):
            if value.any():
                raise DLMScopeError(f"{key} is non-zero: LLaDA's include_qkv_bias format has no attention-output bias")
            continue
        if m := re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
            tensors[f"model.transformer.blocks.{m.group(1)}.{inverse[m.group(2)]}.{m.group(3)}"] = value
        else:
            tensors[{"model.embed_tokens.weight": "model.transformer.wte.weight",
                     "model.norm.weight": "model.transformer.ln_f.weight",
                     "lm_head.weight": "model.transformer.ff_out.weight"}[key]] = value
    config = {
        "model_type": "llada", "architectures": ["LLaDAModelLM"],
        "d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads, "mlp_hidden_size": c.intermediate_size, "mlp_ratio": 4,
        "embedding_size": c.vocab_size, "vocab_size": c.vocab_size, "rope": True,
        "rope_theta": c.rope_parameters["rope_theta"], "rms_norm_eps": c.rms_norm_eps,
        "max_sequence_length": c.max_position_embeddings, "weight_tying": bool(c.tie_word_embeddings),
        "include_bias": bool(c.mlp_bias), "include_qkv_bias": qkv_bias_only, "layer_norm_type": "rms",
        "activation_type": "silu", "block_type": "llama", "block_group_size": 1, "mask_token_id": mask_id,
        "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id, "bos_token_id": c.bos_token_id,
        **(extra_config or {}),
    }
    checks.finite_tensors(f"refusing to save the checkpoint {str(folder)!r}", tensors)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / "model.safetensors", tensors, metadata={"format": "pt"})
    atomic_write_json(folder / "config.json", config)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder
