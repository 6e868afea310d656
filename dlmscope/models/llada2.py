"""LLaDA 2.0 / 2.1 (inclusionAI, `llada2_moe`) run natively: a block-diffusion MoE decoder.

Attention is bidirectional inside a block of `block_size` positions and causal across blocks; a
(B, L) padding mask becomes that block-causal mask with padded keys hidden. Routing is sigmoid
scores, group-limited top-k chosen on `scores + expert_bias`, weights the unbiased scores of the
chosen experts normalised to sum 1 (when top_k > 1) times `routed_scaling_factor`, plus shared experts.

Masking policy for block models (DLM-Scope's, as in block-diffusion training): a corrupted sequence
x_t is read block by block, each block of x_t given the *clean* earlier blocks of x_0
(`teacher_forced_logits`); losses, likelihoods, SAE activations and splicing use that view
whenever a caller passes the clean sequence (`LoadedModel.denoise_logits(xt, clean=x0)`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DLMScopeError
from .attention import AttentionHooks, attention
from .base import LoadedModel
from .checkpoint import iter_safetensors, load_tokenizer, read_config
from .moe import (MoEDecoder, RMSNorm, RouterHooks, SwiGLU, block_causal_mask, check_choice,
                  load_state, mix_experts, require, rotary_inv_freq, wrap_moe)

FAMILY = "llada2"
DEFAULT_BLOCK_SIZE = 32
DEFAULTS = {  # upstream LLaDA2MoeConfig defaults for fields a config.json may omit
    "use_qkv_bias": False, "use_qk_norm": True, "use_bias": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5, "num_experts": 16, "num_shared_experts": 0, "num_experts_per_tok": 2,
    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "first_k_dense_replace": 0,
    "tie_word_embeddings": False, "hidden_act": "silu", "max_position_embeddings": 16384,
    "block_size": DEFAULT_BLOCK_SIZE,
}


class Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, self.n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_heads
        self.head_dim = cfg.get("head_dim") or d // self.n_heads
        self.query_key_value = nn.Linear(d, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=cfg["use_qkv_bias"])
        if cfg["use_qk_norm"]:
            self.query_layernorm = RMSNorm(self.head_dim, cfg["rms_norm_eps"])
            self.key_layernorm = RMSNorm(self.head_dim, cfg["rms_norm_eps"])
        self.dense = nn.Linear(self.n_heads * self.head_dim, d, bias=cfg["use_bias"])
        self.hooks = AttentionHooks()

    def forward(self, x, mask, cos, sin, kv=None):
        b, n, _ = x.shape
        qkv = self.query_key_value(x).view(b, n, self.n_heads + 2 * self.n_kv, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=2)
        if hasattr(self, "query_layernorm"):
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        z = attention(self.hooks, q, k, v, cos=cos[:, None], sin=sin[:, None], mask=mask, kv=kv,
                      scale=self.head_dim ** -0.5)
        return self.dense(z)


class Gate(nn.Module):
    expert_bias: torch.Tensor

    def __init__(self, cfg: dict):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg["num_experts_per_tok"], cfg["n_group"], cfg["topk_group"]
        self.scale = cfg["routed_scaling_factor"]
        self.weight = nn.Parameter(torch.empty(cfg["num_experts"], cfg["hidden_size"]))
        self.register_buffer("expert_bias", torch.zeros(cfg["num_experts"]))

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices of the top_k experts among the topk_group groups with the best top-2 score sums."""
        grouped = scores.unflatten(-1, (self.n_group, -1))
        best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(-1, best_groups, True)
        masked = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(-2)
        return masked.topk(self.top_k, dim=-1).indices


class SparseMoE(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(SwiGLU(cfg["hidden_size"], cfg["moe_intermediate_size"])
                                     for _ in range(cfg["num_experts"]))
        if cfg["num_shared_experts"] is not None:
            self.shared_experts = SwiGLU(cfg["hidden_size"], cfg["moe_intermediate_size"] * cfg["num_shared_experts"])
        self.router_hooks = RouterHooks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        gate, hooks = self.gate, self.router_hooks
        logits = hooks.router_logits(F.linear(x.float(), gate.weight.float()))
        scores = torch.sigmoid(logits)
        indices = gate.choose(scores + gate.expert_bias)
        weights = scores.gather(-1, indices)
        if gate.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = hooks.expert_weights(weights * gate.scale)
        indices = hooks.expert_indices(indices)
        out = mix_experts(x.reshape(-1, d), self.experts, indices.reshape(-1, gate.top_k),
                          weights.reshape(-1, gate.top_k), accumulate=torch.float32).view(b, n, d)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out


class Layer(nn.Module):
    def __init__(self, cfg: dict, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.attention = Attention(cfg)
        self.hook_resid_mid = nn.Identity()  # the residual stream after attention (`blocks.{i}.hook_resid_mid`)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.mlp = SparseMoE(cfg) if moe else SwiGLU(cfg["hidden_size"], cfg["intermediate_size"])

    def forward(self, x, mask, cos, sin, kv=None):
        x = self.hook_resid_mid(x + self.attention(self.input_layernorm(x), mask, cos, sin, kv))
        return x + self.mlp(self.post_attention_layernorm(x))


def resolve_config(raw: dict) -> dict:
    """The config.json with upstream defaults filled in, validated; raises naming the first bad field."""
    cfg = {**DEFAULTS, **raw}
    require(cfg, FAMILY, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    check_choice(cfg, FAMILY, "hidden_act", ("silu",))
    check_choice(cfg, FAMILY, "rope_scaling", (None,))
    if cfg["num_experts"] is not None:
        require(cfg, FAMILY, "moe_intermediate_size")
        e, k, g, tg = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["n_group"], cfg["topk_group"]
        if not (isinstance(g, int) and g > 0 and e % g == 0 and e // g >= 2):
            raise DLMScopeError(f"{FAMILY} config.json: n_group={g!r} must divide num_experts ({e}) into groups of >= 2")
        if not (isinstance(tg, int) and 0 < tg <= g):
            raise DLMScopeError(f"{FAMILY} config.json: topk_group={tg!r} must be in 1..n_group ({g})")
        if not (isinstance(k, int) and 0 < k <= tg * (e // g)):
            raise DLMScopeError(f"{FAMILY} config.json: num_experts_per_tok={k!r} must be in 1..{tg * (e // g)} "
                                "(topk_group * experts per group)")
    if cfg["first_k_dense_replace"] > 0 or cfg["num_experts"] is None:
        require(cfg, FAMILY, "intermediate_size")
    block, context = cfg["block_size"], cfg["max_position_embeddings"]
    if not (isinstance(block, int) and block > 0 and context % block == 0):
        raise DLMScopeError(f"{FAMILY} config.json: block_size={block!r} must be a positive divisor of "
                            f"max_position_embeddings ({context})")
    return cfg


def build(raw: dict, device: str = "meta") -> MoEDecoder:
    """The module for a config; on "meta" (the default) parameters wait for `load_state`."""
    cfg = resolve_config(raw)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    inv_freq = rotary_inv_freq(head_dim, cfg["partial_rotary_factor"], cfg["rope_theta"])
    moe = [cfg["num_experts"] is not None and i >= cfg["first_k_dense_replace"] for i in range(cfg["num_hidden_layers"])]
    with torch.device(device):
        return MoEDecoder([Layer(cfg, m) for m in moe], vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"],
                          eps=cfg["rms_norm_eps"], embed_name="word_embeddings", inv_freq=inv_freq,
                          tie_embeddings=bool(cfg["tie_word_embeddings"]))


def block_mask(attention_mask: torch.Tensor | None, length: int, block_size: int, device) -> torch.Tensor:
    """(B or 1, 1, L, L) bool block-causal mask; padded keys hidden, each query always sees itself."""
    mask = block_causal_mask(length, block_size, device)[None, None]
    if attention_mask is not None:
        eye = torch.eye(length, dtype=torch.bool, device=device)
        mask = (mask & attention_mask.bool()[:, None, None, :]) | eye
    return mask


def teacher_forced_logits(lm: LoadedModel, xt: torch.Tensor, x0: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, L, V) of each block of `xt` given the clean earlier blocks of `x0` (block-diffusion training).

    Two passes: x0 block-causally (keys/values only; a `ForwardState.context` pass hooks skip), then
    xt attending to its own block and to x0's earlier blocks. Hooks see the second pass, (B, L).
    """
    from dataclasses import replace

    from .kvcache import _KeptKV

    if lm.kv_call is None:
        raise DLMScopeError(f"{lm.name}: clean-context denoising needs the native {FAMILY} loader (backend='native')")
    if xt.shape != x0.shape:
        raise DLMScopeError(f"x_t {tuple(xt.shape)} and the clean sequence {tuple(x0.shape)} differ in shape")
    size = lm.block_size
    if not size:
        raise DLMScopeError(f"{lm.name}: clean-context denoising needs a block-diffusion model ({FAMILY})")
    xt, x0 = xt.to(lm.device), x0.to(lm.device)
    B, L = xt.shape
    real = torch.ones_like(xt, dtype=torch.bool) if attention_mask is None else attention_mask.to(lm.device).bool()
    saved = lm.state
    lm.state = replace(saved, context=True)
    try:
        _, clean = lm.kv_call(x0, real.long(), None, None)
    finally:
        lm.state = saved
    block = torch.arange(L, device=xt.device) // size
    earlier = (block[None, :] < block[:, None])[None, None] & real[:, None, None, :]
    same = block_mask(attention_mask, L, size, xt.device) & (block[None, :] == block[:, None])
    mask = torch.cat([earlier, same.expand(B, -1, -1, -1)], -1)
    past = _KeptKV([layer.keys for layer in clean.layers], [layer.values for layer in clean.layers])
    logits, _ = lm.kv_call(xt, mask, torch.arange(L, device=xt.device)[None].expand(B, -1), past)
    return logits


def wrap(module: MoEDecoder, raw: dict, name: str, tokenizer=None) -> LoadedModel:
    cfg = resolve_config(raw)

    def mask_fn(m: torch.Tensor | None, n: int, device: torch.device, block: int | None) -> torch.Tensor:
        assert block, f"a {FAMILY} model always has a block size"
        return block_mask(m, n, block, device)

    mask_id = cfg.get("mask_token_id")
    if mask_id is None and tokenizer is not None:
        mask_id = tokenizer.mask_token_id
    return wrap_moe(module, family=FAMILY, name=name, tokenizer=tokenizer, mask_id=mask_id, d_model=cfg["hidden_size"],
                    vocab_size=cfg["vocab_size"], n_experts=cfg["num_experts"] or 0,
                    n_active=cfg["num_experts_per_tok"] if cfg["num_experts"] else 0, block_size=cfg["block_size"],
                    context_length=cfg["max_position_embeddings"],
                    mask_fn=mask_fn)


def load_llada2(folder: Path, device: str | torch.device, dtype: torch.dtype, name: str | None = None,
                device_map: str | dict | None = None) -> LoadedModel:
    raw = read_config(folder)
    module = load_state(build(raw), dict(iter_safetensors(folder)), FAMILY, device, dtype, device_map)
    return wrap(module, raw, name or folder.name, load_tokenizer(folder))
