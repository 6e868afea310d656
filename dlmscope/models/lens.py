"""TransformerLens in both directions: a native model as a `HookedTransformer`, and a `HookedTransformer` back.

`to_hooked_transformer(lm)` converts LLaDA, Dream and the causal twin (transformers Llama / Qwen2
weights) without folding or centring, attention bidirectional for the diffusion models, so every
TransformerLens tool (`run_with_cache`, `hooks`, patching utilities, circuitsvis) runs on a DLM.
`wrap_transformer_lens(ht, mask_id=...)` (what `load_model(ht, mask_id=...)` calls) turns one back
into a `LoadedModel`: a bidirectional one is a diffusion model the sampler, SAE training, splicing
and steering use like the native one.

Two things TransformerLens does not do for a bidirectional model, added here: it masks padded keys
only under causal attention (`PaddingMask` hides them, as permanent hooks on `hook_attn_scores`),
and with an `attention_mask` it shifts rotary positions under left padding; the `LoadedModel`
therefore passes the padding mask to `PaddingMask` only, keeping absolute positions like the
native models (right padding is identical either way).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch

from .. import checks
from ..errors import DLMScopeError
from .attention import ATTN_SITES
from .base import LoadedModel, Site
from .families import FAMILIES

if TYPE_CHECKING:
    from transformers import LlamaConfig, Qwen2Config


class PaddingMask:
    """Hides padded keys from every attention head of a `HookedTransformer` (scores -> dtype min).

    The mask comes from `ht(tokens, attention_mask=m)` (a forward pre-hook reads it) or from `keys(m)`.
    """

    def __init__(self, model):
        self.mask: torch.Tensor | None = None
        self.forced: torch.Tensor | None = None
        model.register_forward_pre_hook(self._read, with_kwargs=True)
        for block in model.blocks:
            block.attn.hook_attn_scores.add_hook(self._hide, is_permanent=True)

    def _read(self, module, args, kwargs):
        self.mask = self.forced if self.forced is not None else kwargs.get("attention_mask")

    def _hide(self, scores: torch.Tensor, hook) -> torch.Tensor | None:
        if self.mask is None:
            return None
        keys = self.mask.to(scores.device).bool()[:, None, None, -scores.shape[-1]:]
        return scores.masked_fill(~keys, torch.finfo(scores.dtype).min)

    @contextmanager
    def keys(self, mask: torch.Tensor | None):
        """Within the block, forwards hide the keys where the (B, L) `mask` is 0."""
        self.forced = mask
        try:
            yield
        finally:
            self.forced = None


def padding_mask(model) -> PaddingMask:
    """The model's `PaddingMask`, installed on first use."""
    if getattr(model, "dlmscope_padding", None) is None:
        model.dlmscope_padding = PaddingMask(model)
    return model.dlmscope_padding


def _heads(weight: torch.Tensor, n: int) -> torch.Tensor:
    """A projection weight (n * d_head, d_model) -> TransformerLens' (n, d_model, d_head)."""
    return weight.view(n, -1, weight.shape[-1]).transpose(1, 2)


def to_hooked_transformer(lm: LoadedModel, n_ctx: int | None = None):
    """A `transformer_lens.HookedTransformer` with `lm`'s weights, unfolded; bidirectional unless `lm` is causal.

    Supports the transformers Llama / Qwen2 decoders behind LLaDA, Dream and causal models (default
    RoPE, SiLU gated MLP, RMS norms, no MLP biases). Its raw logits equal `lm.forward`'s (Dream's
    stay shifted; `load_model(ht, mask_id=...)` undoes it as for the native model). `n_ctx` (default
    the checkpoint's max_position_embeddings) sizes TransformerLens' per-layer (n_ctx, n_ctx) buffers.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    module = lm.module
    kind = type(module).__name__
    if kind not in ("LlamaForCausalLM", "Qwen2ForCausalLM"):  # native LLaDA, Dream and Llama/Qwen2 causal models
        raise DLMScopeError(f"to_hooked_transformer: {lm.name} is {lm.family} ({kind}); allowed: native LLaDA, Dream "
                            "or a Llama / Qwen2 causal model")
    c = cast("LlamaConfig | Qwen2Config", module.config)  # the class names were checked above
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default" or c.hidden_act != "silu" or getattr(c, "mlp_bias", False):
        raise DLMScopeError(f"to_hooked_transformer: {lm.name} needs default RoPE, SiLU and no MLP biases; it has "
                            f"rope_type={rope.get('rope_type')!r}, hidden_act={c.hidden_act!r}, "
                            f"mlp_bias={getattr(c, 'mlp_bias', False)}")
    H = c.num_attention_heads
    KV = c.num_key_value_heads or H  # transformers fills it in; None would mean no grouping
    D = getattr(c, "head_dim", None) or c.hidden_size // H
    n_ctx = c.max_position_embeddings if n_ctx is None else checks.integer("n_ctx", n_ctx, minimum=1)
    cfg = HookedTransformerConfig(
        n_layers=c.num_hidden_layers, d_model=c.hidden_size, d_head=D, n_heads=H,
        n_key_value_heads=KV if KV != H else None,
        d_mlp=c.intermediate_size, d_vocab=c.vocab_size, n_ctx=n_ctx, act_fn="silu", gated_mlp=True,
        normalization_type="RMS", final_rms=True, eps=c.rms_norm_eps, positional_embedding_type="rotary", rotary_dim=D,
        rotary_base=rope.get("rope_theta", 10000.0), rotary_adjacent_pairs=False,
        attention_dir="causal" if lm.causal else "bidirectional",
        original_architecture=FAMILIES[lm.family].lens_architecture or kind,
        model_name=lm.name, dtype=lm.dtype, device=str(lm.device), init_weights=False,
        default_prepend_bos=getattr(lm.tokenizer, "bos_token_id", None) is not None,
    )
    ht = HookedTransformer(cfg)
    state = _state_dict(module, H, KV, D)
    missing = sorted({n for n, _ in ht.named_parameters()} - set(state))
    if missing or set(state) - set(ht.state_dict()):
        raise DLMScopeError(f"to_hooked_transformer: weights do not map onto {kind}: missing {missing[:4]}, "
                            f"unexpected {sorted(set(state) - set(ht.state_dict()))[:4]}")
    ht.load_state_dict(state, strict=False)
    ht.tokenizer = lm.tokenizer
    padding_mask(ht)
    return ht.eval()


def _state_dict(module, H: int, KV: int, D: int) -> dict[str, torch.Tensor]:
    """transformers Llama / Qwen2 weights under TransformerLens' names; zeros where a bias is absent."""
    m = module.model
    d = m.embed_tokens.weight.shape[1]
    like = m.embed_tokens.weight
    kv = "_" if KV != H else ""
    state: dict[str, torch.Tensor] = {"embed.W_E": m.embed_tokens.weight, "ln_final.w": m.norm.weight,
                                      "unembed.W_U": module.lm_head.weight.T,
                                      "unembed.b_U": like.new_zeros(module.lm_head.weight.shape[0])}
    for i, layer in enumerate(m.layers):
        a, mlp, p = layer.self_attn, layer.mlp, f"blocks.{i}."
        state.update({
            p + "ln1.w": layer.input_layernorm.weight, p + "ln2.w": layer.post_attention_layernorm.weight,
            p + "attn.W_Q": _heads(a.q_proj.weight, H), p + f"attn.{kv}W_K": _heads(a.k_proj.weight, KV),
            p + f"attn.{kv}W_V": _heads(a.v_proj.weight, KV), p + "attn.W_O": a.o_proj.weight.T.reshape(H, D, d),
            p + "mlp.W_gate": mlp.gate_proj.weight.T, p + "mlp.W_in": mlp.up_proj.weight.T,
            p + "mlp.W_out": mlp.down_proj.weight.T,
            p + "mlp.b_in": like.new_zeros(mlp.up_proj.weight.shape[0]), p + "mlp.b_out": like.new_zeros(d),
        })
        for name, proj, n in (("b_Q", a.q_proj, H), (f"{kv}b_K", a.k_proj, KV), (f"{kv}b_V", a.v_proj, KV)):
            state[p + f"attn.{name}"] = (proj.bias if proj.bias is not None else like.new_zeros(n * D)).view(n, D)
        state[p + "attn.b_O"] = a.o_proj.bias if a.o_proj.bias is not None else like.new_zeros(d)
    return {k: v.detach().clone() for k, v in state.items()}


def _sites(model) -> dict[str, Site]:
    """dlmscope's hook names on TransformerLens' hook points (mlp_in: the normalised input the MLP reads)."""
    rotary = model.cfg.positional_embedding_type == "rotary"
    sites: dict[str, Site] = {}
    for i, block in enumerate(model.blocks):
        sites[f"blocks.{i}.hook_resid_pre"] = Site(block.hook_resid_pre, "output")
        for kind in ATTN_SITES:
            if rotary or not kind.startswith("rot_"):
                sites[f"blocks.{i}.attn.hook_{kind}"] = Site(getattr(block.attn, f"hook_{kind}"), "output",
                                                              pos_dim=2 if kind == "pattern" else 1)
        sites[f"blocks.{i}.hook_attn_out"] = Site(block.hook_attn_out, "output")
        if not model.cfg.parallel_attn_mlp:
            sites[f"blocks.{i}.hook_resid_mid"] = Site(block.hook_resid_mid, "output")
        sites[f"blocks.{i}.hook_mlp_in"] = Site(block.mlp, "input")
        sites[f"blocks.{i}.hook_mlp_out"] = Site(block.hook_mlp_out, "output")
        sites[f"blocks.{i}.hook_resid_post"] = Site(block.hook_resid_post, "output")
    return sites


def wrap_transformer_lens(model, name: str | None = None, mask_id: int | None = None) -> LoadedModel:
    """A `HookedTransformer` as a `LoadedModel`: causal -> an autoregressive baseline, bidirectional -> a
    diffusion model (`mask_id`, else the tokenizer's mask token). Hook points keep their names.

    A converted LLaDA or Dream keeps its family (`llada` / `dream`: the sampler's defaults follow it);
    any other model is family `transformer_lens`.
    """
    tokenizer: Any = model.tokenizer
    causal = model.cfg.attention_dir == "causal"
    if causal and mask_id is not None:
        raise DLMScopeError(f"mask_id={mask_id} given, but {model.cfg.model_name}'s attention is causal; only a "
                            "bidirectional HookedTransformer (attention_dir='bidirectional') is a diffusion model")
    if not causal:
        mask_id = mask_id if mask_id is not None else getattr(tokenizer, "mask_token_id", None)
        if mask_id is None:
            raise DLMScopeError(f"{model.cfg.model_name} is bidirectional: pass mask_id= "
                                "(its tokenizer has no mask token)")
        if not 0 <= int(mask_id) < model.cfg.d_vocab:
            raise DLMScopeError(f"mask_id={mask_id} is outside the vocabulary 0..{model.cfg.d_vocab - 1}")
    padding = padding_mask(model)

    def call(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if causal:  # TransformerLens' own causal + padding semantics
            return model(input_ids, return_type="logits", attention_mask=attention_mask)
        with padding.keys(attention_mask):
            return model(input_ids, return_type="logits")

    arch = model.cfg.original_architecture
    family = next((f.name for f in FAMILIES.values() if f.lens_architecture == arch and not causal), "transformer_lens")
    return LoadedModel(module=model, tokenizer=tokenizer, family=family, mask_id=mask_id,
                       shift=FAMILIES[family].shift, causal=causal,
                       layers=list(model.blocks), d_model=model.cfg.d_model, vocab_size=model.cfg.d_vocab,
                       name=name or model.cfg.model_name, sites=_sites(model), call=call)
