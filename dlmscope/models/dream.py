"""Dream checkpoints run natively as transformers' Qwen2 with bidirectional attention.

Dream's logits are shifted (position i-1 predicts token i); `LoadedModel.shift` records it and
`LoadedModel.denoise_logits` undoes it, so no caller has to special-case Dream.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DLMScopeError
from .base import LoadedModel
from .checkpoint import build_hf_module, iter_safetensors, load_tokenizer, read_config, wrap_decoder

_QWEN2_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
    "hidden_act", "pad_token_id", "bos_token_id", "eos_token_id",
)


def qwen2_config(cfg: dict):
    from transformers import Qwen2Config

    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if name not in cfg:
            raise DLMScopeError(f"Dream config.json lacks {name!r}")
    kwargs = {k: cfg[k] for k in _QWEN2_FIELDS if cfg.get(k) is not None}
    if cfg.get("rope_scaling"):
        kwargs["rope_parameters"] = {**cfg["rope_scaling"], "rope_theta": cfg.get("rope_theta", 10000.0)}
    return Qwen2Config(use_sliding_window=False, **kwargs)


def load_dream(folder: Path, device: str | torch.device, dtype: torch.dtype, name: str | None = None,
               device_map: str | dict | None = None) -> LoadedModel:
    from transformers import Qwen2ForCausalLM

    cfg = read_config(folder)
    config = qwen2_config(cfg)
    module = build_hf_module(Qwen2ForCausalLM, config, iter_safetensors(folder), lambda k: k, device, dtype,
                             device_map)
    tokenizer = load_tokenizer(folder)
    mask_id = cfg.get("mask_token_id")
    if mask_id is None and tokenizer is not None:
        mask_id = tokenizer.mask_token_id
    return wrap_decoder(module, family="dream", name=name or folder.name, tokenizer=tokenizer,
                        mask_id=mask_id, shift=True, causal=False)
