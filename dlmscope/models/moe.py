"""Building blocks shared by the native mixture-of-experts DLM loaders (LLaDA-MoE, LLaDA 2.x).

Neither family maps exactly onto a transformers class (LLaDA-MoE mixes experts with bias-shifted
softmax weights and an ungated shared expert; LLaDA 2.x has a fused q/k/v projection, an output bias
and sigmoid group routing), so both are small modules of our own whose parameter names are the
upstream state-dict keys: checkpoints load without renaming. Routers expose three identity
submodules so the hook machinery can read or edit logits, chosen experts and their weights.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DLMScopeError
from .base import LoadedModel, Site, hf_sites, site_key
from .checkpoint import place

ROUTER_SITES = ("router_logits", "expert_weights", "expert_indices")
"""Per-MoE-layer hook sites, in the order the forward pass reaches them."""


class RMSNorm(nn.Module):
    """RMS norm computed in float32, scaled after casting back (the order upstream uses)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RouterHooks(nn.Module):
    """Identity modules the hook sites `blocks.{i}.hook_{router_logits,expert_weights,expert_indices}` attach to.

    Each takes and returns a (B, L, ·) tensor, so captures and edits work per position like the residual stream.
    """

    def __init__(self):
        super().__init__()
        self.router_logits = nn.Identity()
        self.expert_weights = nn.Identity()
        self.expert_indices = nn.Identity()


def mix_experts(x: torch.Tensor, experts: nn.ModuleList, indices: torch.Tensor, weights: torch.Tensor,
                accumulate: torch.dtype) -> torch.Tensor:
    """sum_k weights[n, k] * experts[indices[n, k]](x[n]) for flat tokens x (N, d), summed in `accumulate`."""
    out = torch.zeros(x.shape, dtype=accumulate, device=x.device)
    for e in indices.unique().tolist():
        token, slot = torch.where(indices == e)
        y = experts[e](x[token]).to(accumulate) * weights[token, slot, None].to(accumulate)
        out.index_add_(0, token, y)
    return out.to(x.dtype)


def rotary_inv_freq(head_dim: int, partial_rotary_factor: float, theta: float) -> torch.Tensor:
    dim = int(head_dim * partial_rotary_factor)
    if dim < 2 or dim % 2:
        raise DLMScopeError(f"partial_rotary_factor {partial_rotary_factor} gives rotary dim {dim}; it must be even and >= 2")
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rotary_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, rotary_dim) cos and sin for the (L,) positions, computed in float32."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device, torch.float32)[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class _Body(nn.Module):
    """The `model.` part of the upstream key names: embedding (added under its upstream name), layers, norm."""

    layers: nn.ModuleList
    norm: RMSNorm


class MoEDecoder(nn.Module):
    """Embedding, decoder layers, final norm, LM head. Layers take (x, mask, cos, sin) and return x.

    `embed_name` keeps the upstream key of the embedding (`embed_tokens` or `word_embeddings`).
    """

    inv_freq: torch.Tensor

    def __init__(self, layers: list[nn.Module], *, vocab_size: int, d_model: int, eps: float, embed_name: str,
                 inv_freq: torch.Tensor, tie_embeddings: bool):
        super().__init__()
        self.model = _Body()
        self.embed_name = embed_name
        setattr(self.model, embed_name, nn.Embedding(vocab_size, d_model))
        self.model.layers = nn.ModuleList(layers)
        self.model.norm = RMSNorm(d_model, eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = getattr(self.model, embed_name).weight
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None = None,
                past=None, keep_kv: bool = False):
        """Float32 logits (B, L, V). `positions` (L,) default 0..L-1; `past.update(k, v, layer)` prepends
        cached keys/values; `keep_kv` also returns this pass's keys/values (a `RecordedKV`)."""
        x = getattr(self.model, self.embed_name)(input_ids)
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = rotary_cos_sin(self.inv_freq, positions, x.dtype)
        recorded = RecordedKV() if keep_kv else None
        for i, layer in enumerate(self.model.layers):
            kv: Callable[..., Any] | None = None
            if past is not None:
                kv = lambda k, v, i=i: past.update(k, v, i)  # noqa: E731
            elif recorded is not None:
                kv = recorded.add
            x = layer(x, mask, cos, sin, kv)
        logits = self.lm_head(self.model.norm(x)).float()
        return (logits, recorded) if keep_kv else logits


class RecordedKV:
    """Keys/values of every layer from one forward, in the shape of a transformers cache (`.layers[i].keys`)."""

    def __init__(self):
        self.layers: list[SimpleNamespace] = []

    def add(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.layers.append(SimpleNamespace(keys=k, values=v))
        return k, v


def block_causal_mask(length: int, block_size: int, device) -> torch.Tensor:
    """(L, L) bool: query i sees key j when j's block is not after i's (bidirectional inside a block)."""
    block = torch.arange(length, device=device) // block_size
    return block[None, :] <= block[:, None]


def load_state(module: MoEDecoder, tensors: dict[str, torch.Tensor], family: str, device, dtype,
               device_map: str | dict | None = None) -> MoEDecoder:
    """Strictly load upstream-keyed `tensors` into a module built on the meta device, then `place` it."""
    expected = set(module.state_dict())
    tied = module.lm_head.weight is getattr(module.model, module.embed_name).weight
    if tied:
        expected.discard("lm_head.weight")
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise DLMScopeError(f"checkpoint does not match the {family} layout: missing {missing[:4]}, unexpected {unexpected[:4]}")
    floats = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    module.load_state_dict(floats, strict=False, assign=True)
    if tied:
        module.lm_head.weight = getattr(module.model, module.embed_name).weight
    return place(module, device, dtype, device_map)


def require(cfg: dict, family: str, *names: str) -> None:
    for name in names:
        if cfg.get(name) is None:
            raise DLMScopeError(f"{family} config.json lacks {name!r}")


def check_choice(cfg: dict, family: str, name: str, allowed: tuple[Any, ...]) -> None:
    if cfg.get(name) not in allowed:
        raise DLMScopeError(f"{family} config.json: {name}={cfg.get(name)!r} is not supported; allowed: "
                            + ", ".join(repr(a) for a in allowed))


def wrap_moe(module: MoEDecoder, *, family: str, name: str, tokenizer, mask_id: int | None, d_model: int,
             vocab_size: int, n_experts: int, n_active: int, block_size: int | None, context_length: int | None,
             mask_fn: Callable[[torch.Tensor | None, int, torch.device, int | None], torch.Tensor | None],
             ) -> LoadedModel:
    """LoadedModel around a `MoEDecoder`; `mask_fn(padding mask or None, L, device, block size)` builds the attention
    mask, reading the model's `block_size` at each call (a block model's block length may change after loading)."""
    layers = list(module.model.layers)
    sites: dict[str, Site] = hf_sites(layers, "post_attention_layernorm")
    for i, layer in enumerate(layers):
        hooks = getattr(layer.mlp, "router_hooks", None)
        if hooks is not None:
            for site in ROUTER_SITES:
                sites[f"blocks.{i}.hook_{site}"] = Site(getattr(hooks, site), "output")
    sites = dict(sorted(sites.items(), key=lambda kv: site_key(kv[0])))

    def call(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return module(input_ids, mask_fn(attention_mask, input_ids.shape[1], input_ids.device, lm.block_size))

    def kv_call(input_ids, attention_mask, position_ids, past):
        """The `LoadedModel.kv_call` protocol of `models.kvcache`: a 2-D mask gets the family's own structure."""
        if attention_mask.dim() == 2:
            attention_mask = mask_fn(None if bool(attention_mask.all()) else attention_mask, input_ids.shape[1],
                                     input_ids.device, lm.block_size)
        positions = None if position_ids is None else position_ids[0]
        if past is not None:
            return module(input_ids, attention_mask, positions, past), None
        return module(input_ids, attention_mask, positions, keep_kv=True)

    lm = LoadedModel(module=module, tokenizer=tokenizer, family=family, mask_id=mask_id, shift=False, causal=False,
                     layers=layers, d_model=d_model, vocab_size=vocab_size, name=name, sites=sites, call=call,
                     kv_call=kv_call, n_experts=n_experts, n_active_experts=n_active, block_size=block_size,
                     context_length=context_length)
    return lm
