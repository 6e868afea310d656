"""Attention with TransformerLens' hook sites inside it, one code path for every native family.

Each attention module owns an `AttentionHooks` of identity submodules the sites attach to:
`hook_q`, `hook_k`, `hook_v` (B, L, heads, d_head) before rotary (keys/values with the model's
key/value heads), `hook_rot_q`, `hook_rot_k` after it, `hook_pattern` (B, heads, L_q, L_k) and
`hook_z` (B, L, heads, d_head), the per-head outputs the output projection mixes. The pattern is
materialised only while a hook is attached to `hook_pattern`; otherwise the fused SDPA kernel runs.
Keys and values are edited before a KV cache stores them, so an edit reaches later cached steps.
`HFAttention` also carries its layer's `hook_attn_out` and `hook_resid_mid` (see `HFAttention.forward`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

ATTN_SITES = ("q", "k", "v", "rot_q", "rot_k", "pattern", "z")
"""Sites inside attention, in the order a forward pass reaches them (`blocks.{i}.attn.hook_{site}`)."""

KV = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Fused = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class AttentionHooks(nn.Module):
    """Identity submodules `hook_{q,k,v,rot_q,rot_k,pattern,z}`: forward hooks on them read or replace the value."""

    hook_q: nn.Identity
    hook_k: nn.Identity
    hook_v: nn.Identity
    hook_rot_q: nn.Identity
    hook_rot_k: nn.Identity
    hook_pattern: nn.Identity
    hook_z: nn.Identity

    def __init__(self):
        super().__init__()
        for site in ATTN_SITES:
            setattr(self, f"hook_{site}", nn.Identity())

    def wants_pattern(self) -> bool:
        return bool(self.hook_pattern._forward_hooks)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first rotary_dim channels of x; cos/sin broadcast against x[..., :rotary_dim]."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Fused attention over (B, H, L, D) with grouped key/value heads; mask bool, True = may attend. -> (B, L, H, D)."""
    k, v = _expand_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False).transpose(1, 2)


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # key/value head j serves query heads j*groups .. (j+1)*groups - 1
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return k, v


def pattern_attention(hooks: AttentionHooks, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None, scale: float, causal: bool) -> torch.Tensor:
    """Attention with the pattern (B, H, L_q, L_k) passed through `hook_pattern`. -> (B, L, H, D).

    `mask`: bool (True = may attend), additive float, or None (every key, or causal when `causal`:
    query i sees keys up to i + L_k - L_q, the convention of SDPA's `is_causal` with kept keys before).
    """
    k, v = _expand_kv(q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is None and causal and q.shape[-2] > 1:
        lq, lk = q.shape[-2], k.shape[-2]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    if mask is not None:
        scores = (scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool
                  else scores + mask.float())
    pattern = hooks.hook_pattern(scores.softmax(-1).to(q.dtype))
    return torch.matmul(pattern, v).transpose(1, 2)


def attention(hooks: AttentionHooks, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, scale: float, kv: KV | None = None,
              causal: bool = False, fused: Fused = sdpa) -> torch.Tensor:
    """q, k, v (B, L, heads, d_head) before rotary -> z flattened (B, L, heads * d_head), through every hook.

    `cos`/`sin` broadcast against (B, L, heads, rotary_dim); `kv(k, v)` sees the (B, kv_heads, L, D)
    rotated keys and values (a cache prepends kept ones or records them); `fused(q, k, v, mask)` is the
    family's own attention kernel, used whenever no hook reads the pattern.
    """
    q, k, v = hooks.hook_q(q), hooks.hook_k(k), hooks.hook_v(v)
    q = hooks.hook_rot_q(apply_rotary(q, cos, sin)).transpose(1, 2)
    k = hooks.hook_rot_k(apply_rotary(k, cos, sin)).transpose(1, 2)
    v = v.transpose(1, 2)
    if kv is not None:
        k, v = kv(k, v)
    z = pattern_attention(hooks, q, k, v, mask, scale, causal) if hooks.wants_pattern() else fused(q, k, v, mask)
    return hooks.hook_z(z).flatten(2)


class HFAttention(nn.Module):
    """transformers' Llama / Qwen2 attention rewritten through `attention`; parameter names unchanged.

    It replaces a layer's `self_attn` (`hook_hf_attention`), so checkpoints, LoRA targets and the
    transformers decoder layer that calls it see the same module tree, plus `hooks` and the identities
    `hook_attn_out` and `hook_resid_mid` (no parameters).
    """

    def __init__(self, attn: LlamaAttention | Qwen2Attention):
        super().__init__()
        self.config, self.layer_idx = attn.config, attn.layer_idx
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.num_key_value_groups, self.is_causal = attn.num_key_value_groups, attn.is_causal
        self.attention_dropout = attn.attention_dropout
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.hooks = AttentionHooks()
        self.hook_attn_out, self.hook_resid_mid = nn.Identity(), nn.Identity()
        self.resid_pre: torch.Tensor | None = None  # the layer's input, kept only while hook_resid_mid is hooked

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, past_key_values=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (proj(hidden_states).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = (t.unsqueeze(2) for t in position_embeddings)  # (B, L, D) -> broadcast over heads
        kernel = ALL_ATTENTION_FUNCTIONS.get(self.config._attn_implementation)  # None: "eager", ours is explicit

        def fused(q, k, v, mask):
            if kernel is None:
                return pattern_attention(self.hooks, q, k, v, mask, self.scaling, self.is_causal)
            return kernel(self, q, k, v, mask, dropout=self.attention_dropout if self.training else 0.0,
                          scaling=self.scaling, **kwargs)[0]

        def kv(k, v):
            return past_key_values.update(k, v, self.layer_idx)

        z = attention(self.hooks, q, k, v, cos=cos, sin=sin, mask=attention_mask, scale=self.scaling,
                      kv=None if past_key_values is None else kv, causal=self.is_causal, fused=fused)
        return self.through_resid_mid(self.hook_attn_out(self.o_proj(z))), None

    def through_resid_mid(self, out: torch.Tensor) -> torch.Tensor:
        """Pass resid_pre + attn_out through `hook_resid_mid`; an edit comes back as a change of attn_out.

        The transformers layer keeps its own `residual` variable, so editing its second norm's input would
        reach only the MLP; returning edited_mid - resid_pre makes the residual stream (resid_post, later
        layers) and the MLP both carry the edit, as in TransformerLens. Unhooked, nothing is computed.
        """
        resid_pre, self.resid_pre = self.resid_pre, None
        if resid_pre is None or not self.hook_resid_mid._forward_hooks:
            return out
        mid = resid_pre + out
        new = self.hook_resid_mid(mid)
        return out if new is mid else new - resid_pre

    def keep_resid_pre(self, norm: nn.Module, args: tuple) -> None:
        """Forward pre-hook on the layer's first norm (a bound method, so a deep copy keeps its own)."""
        if self.hook_resid_mid._forward_hooks:
            self.resid_pre = args[0]


_HF_ATTENTION = ("LlamaAttention", "Qwen2Attention")


def hook_hf_attention(layers: list[nn.Module]) -> None:
    """Swap each layer's transformers Llama / Qwen2 `self_attn` for an `HFAttention`; other types stay as they are.

    The first norm's input is the layer's residual after any resid_pre edit: a permanent pre-hook there keeps
    it (only while `hook_resid_mid` is hooked) for `HFAttention.through_resid_mid`.
    """
    for layer in layers:
        attn: Any = getattr(layer, "self_attn", None)
        if type(attn).__name__ in _HF_ATTENTION and getattr(attn, "sliding_window", None) is None:
            layer.self_attn = new = HFAttention(attn)
            layer.get_submodule("input_layernorm").register_forward_pre_hook(new.keep_resid_pre)


def attention_module(layer: nn.Module) -> nn.Module | None:
    """The layer's attention module when it carries `AttentionHooks` (None for models without attention sites)."""
    for name in ("self_attn", "attention"):
        attn = getattr(layer, name, None)
        if isinstance(getattr(attn, "hooks", None), AttentionHooks):
            return attn
    return None
