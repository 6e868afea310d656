"""LLaDA-MoE (inclusionAI LLaDA-MoE-7B-A1B) run natively: bidirectional OLMoE/Qwen-style MoE decoder.

Upstream behaviour kept on purpose: the router adds `expert_bias` to the softmax probabilities and
mixes experts with those biased values; `norm_topk_prob` in the config is ignored (upstream fixes it
to False); the shared expert is added ungated; q/k norms act per head before RoPE.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DLMScopeError
from .attention import AttentionHooks, attention
from .base import LoadedModel, bidirectional_mask
from .checkpoint import iter_safetensors, load_tokenizer, read_config
from .moe import (MoEDecoder, RMSNorm, RouterHooks, SwiGLU, check_choice, load_state,
                  mix_experts, require, rotary_inv_freq, wrap_moe)

FAMILY = "lladamoe"


class Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, self.n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_heads
        self.head_dim = d // self.n_heads
        bias = bool(cfg.get("attention_bias", False))
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)
        if cfg.get("qk_layernorm"):
            self.q_norm = RMSNorm(self.head_dim, cfg.get("rms_norm_eps", 1e-5))
            self.k_norm = RMSNorm(self.head_dim, cfg.get("rms_norm_eps", 1e-5))
        self.clip = cfg.get("clip_qkv")
        self.hooks = AttentionHooks()

    def forward(self, x, mask, cos, sin, kv=None):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, n, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        z = attention(self.hooks, q, k, v, cos=cos[:, None], sin=sin[:, None], mask=mask, kv=kv,
                      scale=self.head_dim ** -0.5)
        return self.o_proj(z)


class SparseMoE(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.top_k = cfg["num_experts_per_tok"]
        self.gate = nn.Linear(cfg["hidden_size"], cfg["num_experts"], bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg["hidden_size"], cfg["expert_intermediate_size"])
                                     for _ in range(cfg["num_experts"]))
        if cfg.get("moe_router_enable_expert_bias"):
            self.register_buffer("expert_bias", torch.zeros(cfg["num_experts"]))
        else:
            self.expert_bias = None
        self.router_hooks = RouterHooks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        logits = self.router_hooks.router_logits(self.gate(x))
        probs = F.softmax(logits.float(), dim=-1)
        if self.expert_bias is not None:
            probs = probs + self.expert_bias
        weights, indices = probs.topk(self.top_k, dim=-1)
        weights = self.router_hooks.expert_weights(weights.to(x.dtype))
        indices = self.router_hooks.expert_indices(indices)
        flat = mix_experts(x.reshape(-1, d), self.experts, indices.reshape(-1, self.top_k),
                           weights.reshape(-1, self.top_k), accumulate=x.dtype)
        return flat.view(b, n, d)


class Layer(nn.Module):
    def __init__(self, cfg: dict, moe: bool):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-5)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.self_attn = Attention(cfg)
        self.hook_resid_mid = nn.Identity()  # the residual stream after attention (`blocks.{i}.hook_resid_mid`)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.mlp = SparseMoE(cfg) if moe else SwiGLU(cfg["hidden_size"], cfg["dense_intermediate_size"])
        if moe and cfg.get("shared_expert_intermediate_size") is not None:
            self.shared_expert = SwiGLU(cfg["hidden_size"], cfg["shared_expert_intermediate_size"])

    def forward(self, x, mask, cos, sin, kv=None):
        x = self.hook_resid_mid(x + self.self_attn(self.input_layernorm(x), mask, cos, sin, kv))
        h = self.post_attention_layernorm(x)
        out = self.mlp(h)
        if hasattr(self, "shared_expert"):
            out = out + self.shared_expert(h)
        return x + out


def moe_layers(cfg: dict) -> list[bool]:
    """Which layers are MoE (`moe_layer_freq[i] != 0`), validated against the config's other fields."""
    require(cfg, FAMILY, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "num_experts",
            "num_experts_per_tok", "expert_intermediate_size", "rope_theta")
    check_choice(cfg, FAMILY, "moe_router_score_function", (None, "softmax"))
    check_choice(cfg, FAMILY, "hidden_act", ("silu",))
    check_choice(cfg, FAMILY, "rope_scaling", (None,))
    n = cfg["num_hidden_layers"]
    freq = cfg.get("moe_layer_freq")
    if not isinstance(freq, list) or len(freq) != n:
        raise DLMScopeError(f"{FAMILY} config.json: moe_layer_freq must list one entry per layer ({n}); got {freq!r}")
    moe = [f != 0 for f in freq]
    if not all(moe):
        require(cfg, FAMILY, "dense_intermediate_size")
    if not 0 < cfg["num_experts_per_tok"] <= cfg["num_experts"]:
        raise DLMScopeError(f"{FAMILY} config.json: num_experts_per_tok={cfg['num_experts_per_tok']} must be in "
                            f"1..num_experts ({cfg['num_experts']})")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise DLMScopeError(f"{FAMILY} config.json: hidden_size {cfg['hidden_size']} is not divisible by "
                            f"num_attention_heads {cfg['num_attention_heads']}")
    return moe


def build(cfg: dict, device: str = "meta") -> MoEDecoder:
    """The module for a config; on "meta" (the default) parameters wait for `load_state`."""
    moe = moe_layers(cfg)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    prf = cfg.get("partial_rotary_factor", 1.0)
    inv_freq = rotary_inv_freq(head_dim, 1.0 if prf is None else prf, cfg["rope_theta"])
    with torch.device(device):
        return MoEDecoder([Layer(cfg, m) for m in moe], vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"],
                          eps=cfg.get("rms_norm_eps", 1e-5), embed_name="embed_tokens", inv_freq=inv_freq,
                          tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def wrap(module: MoEDecoder, cfg: dict, name: str, tokenizer=None) -> LoadedModel:
    mask_id = cfg.get("mask_token_id")
    if mask_id is None and tokenizer is not None:
        mask_id = tokenizer.mask_token_id
    return wrap_moe(module, family=FAMILY, name=name, tokenizer=tokenizer, mask_id=mask_id, d_model=cfg["hidden_size"],
                    vocab_size=cfg["vocab_size"], n_experts=cfg["num_experts"], n_active=cfg["num_experts_per_tok"],
                    block_size=None, context_length=cfg.get("max_position_embeddings"),
                    mask_fn=lambda m, n, device, block: None if m is None else bidirectional_mask(m))


def load_lladamoe(folder: Path, device: str | torch.device, dtype: torch.dtype, name: str | None = None,
                  device_map: str | dict | None = None) -> LoadedModel:
    cfg = read_config(folder)
    module = build(cfg)
    module = load_state(module, dict(iter_safetensors(folder)), FAMILY, device, dtype, device_map)
    return wrap(module, cfg, name or folder.name, load_tokenizer(folder))
