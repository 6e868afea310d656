"""`LoadedModel`: the one interface every analysis talks to, whatever the checkpoint family."""

from __future__ import annotations

import copy
import re
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import DLMScopeError

SITE_ORDER = ("resid_pre", "attn.q", "attn.k", "attn.v", "attn.rot_q", "attn.rot_k", "attn.pattern", "attn.z",
              "attn_out", "resid_mid", "mlp_in", "router_logits", "expert_weights", "expert_indices", "mlp_out",
              "resid_post")
"""Per-layer hook sites in the order a forward pass reaches them (router sites exist on MoE layers only;
`attn.*` sites and attn_out on models whose attention carries `models.attention.AttentionHooks`)."""
ROUTER_SITES = ("router_logits", "expert_weights", "expert_indices")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(attn\.)?hook_(\w+)$")


def hook_name(layer: int, kind: str) -> str:
    """`blocks.{layer}.hook_{kind}`, or `blocks.{layer}.attn.hook_{site}` for a kind `attn.{site}`."""
    if kind.startswith("attn."):
        return f"blocks.{layer}.attn.hook_{kind[5:]}"
    return f"blocks.{layer}.hook_{kind}"


def parse_hook(name: str) -> tuple[int, str] | None:
    """(layer, kind) of a well-formed hook name (kind one of `SITE_ORDER`), else None."""
    m = _HOOK_RE.match(name)
    if m is None:
        return None
    kind = (m.group(2) or "") + m.group(3)
    return (int(m.group(1)), kind) if kind in SITE_ORDER else None


def site_key(name: str) -> tuple[int, int]:
    """(layer, index in `SITE_ORDER`) of a well-formed hook name: sorts names in forward order."""
    parsed = parse_hook(name)
    assert parsed is not None, f"not a hook name: {name!r}"
    layer, kind = parsed
    return layer, SITE_ORDER.index(kind)


@dataclass
class ForwardState:
    """What the sampler tells hooks about the forward pass in flight.

    Outside the sampler everything is `None`: a plain forward is "no particular step".
    """

    step: int | None = None
    n_steps: int | None = None
    block: int | None = None
    mask: torch.Tensor | None = None  # (B, L) bool: positions still masked in x_t
    t: float | None = None  # fraction of generated positions still masked
    window: tuple[int, int] | None = None  # a KV-cached step computes only positions [start, end) of `mask`
    context: bool = False  # a pass that only builds clean context (block models' earlier blocks): hooks skip it


@dataclass
class Site:
    """Where a hook name lives: the module and whether it reads the module's input or output."""

    module: nn.Module
    where: str  # "input" | "output"
    pos_dim: int = 1  # the axis of sequence positions (the queries' axis, 2, for hook_pattern)


@dataclass
class LoadedModel:
    """A language model behind one small interface.

    `forward` returns raw logits. For diffusion models use `denoise_logits`, whose position i
    always predicts token i (Dream's shift is undone there), so losses and samplers never need
    to know the family.
    """

    module: nn.Module
    tokenizer: Any
    family: str
    mask_id: int | None
    shift: bool
    causal: bool
    layers: list[nn.Module]
    d_model: int
    vocab_size: int
    name: str
    sites: dict[str, Site] = field(repr=False, default_factory=dict)
    call: Callable[..., torch.Tensor] | None = field(repr=False, default=None)
    state: ForwardState = field(repr=False, default_factory=ForwardState)
    n_experts: int | None = None  # routed experts per MoE layer; None for dense models
    n_active_experts: int | None = None  # experts chosen per token
    block_size: int | None = None  # block-diffusion models: attention is causal across blocks of this size
    pad_id: int | None = None  # pads left-padded prompts (hidden from attention by the padding mask)
    eos_id: int | None = None  # ends generated texts; EOS early stop
    context_length: int | None = None  # longest sequence the checkpoint was built for, when it says
    kv_call: Callable[..., tuple[torch.Tensor, Any]] | None = field(repr=False, default=None)
    """(ids, attention_mask 2-D or 4-D, position_ids, kept keys/values) -> (raw logits, new cache); None when
    the model cannot run Fast-dLLM's block KV cache (see `models.kvcache`)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "block_size" and "block_size" in self.__dict__:
            value = self._checked_block_size(value)
        object.__setattr__(self, name, value)

    def __deepcopy__(self, memo: dict) -> LoadedModel:
        """A copy that runs its own weights (e.g. the RL reference model). `call` and `kv_call` are closures over
        the module; a plain deepcopy would share them, so the copy would still run the original module."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            object.__setattr__(new, name, _deepcopy_value(value, memo))
        return new

    def _checked_block_size(self, value: Any) -> int:
        """A block model may change its block length (attention, samplers and caches read it at call time);
        a fully bidirectional model has none to change."""
        if not self.__dict__["block_size"]:
            raise DLMScopeError(f"block_size={value!r} is invalid for {self.name} ({self.family}): it attends "
                                "bidirectionally; only block-diffusion models (LLaDA 2.x) have a block length")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DLMScopeError(f"block_size={value!r} is invalid for {self.name}; allowed: a positive integer")
        return value

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hook_names(self) -> list[str]:
        return list(self.sites)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def is_diffusion(self) -> bool:
        return not self.causal

    @property
    def readout_offset(self) -> int:
        """Which token the residual at position i is read out as: i + 0 for masked LMs, i + 1 for causal and
        shifted (Dream-style) models, whose raw logits at i predict the next token."""
        return int(self.causal or self.shift)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def final_norm_weight(self) -> torch.Tensor | None:
        """The final RMSNorm's weight of HF-style decoders (`model.norm`), or None when there is none."""
        weight = getattr(getattr(getattr(self.module, "model", None), "norm", None), "weight", None)
        return weight.detach() if isinstance(weight, torch.Tensor) else None

    def direct_logits(self, directions: torch.Tensor) -> torch.Tensor:
        """Direct logit attribution of residual directions (..., d_model) -> (..., vocab), float, on their device.

        Through the final norm's weight with its input-dependent scale frozen (a positive factor per position, so
        no ranking of tokens depends on it), then the unembedding.
        """
        out = getattr(self.module, "get_output_embeddings", lambda: None)()
        if out is None:
            raise DLMScopeError(f"{self.name} exposes no output embedding (get_output_embeddings); "
                                "no logit attribution")
        w_u = out.weight.detach().float()
        d = directions.detach().float().to(w_u.device)
        norm = self.final_norm_weight()
        if norm is not None:
            d = d * norm.float().to(w_u.device)
        return (d @ w_u.t()).to(directions.device)

    def site(self, hook_name: str) -> Site:
        if hook_name not in self.sites:
            parsed = parse_hook(hook_name)
            if parsed and parsed[0] >= self.n_layers:
                raise DLMScopeError(
                    f"hook {hook_name!r} is out of range: {self.name} has layers 0..{self.n_layers - 1}"
                )
            present = {p[1] for p in map(parse_hook, self.sites) if p is not None}
            kinds = [k for k in SITE_ORDER if k in present]
            if parsed and parsed[1].startswith("attn") and "attn.q" not in kinds:
                raise DLMScopeError(
                    f"hook {hook_name!r}: {self.name} ({self.family}) exposes no attention internals; they need a "
                    "native LLaDA, Dream, LLaDA-MoE, LLaDA 2.x or Llama/Qwen2 causal model, or to_hooked_transformer"
                )
            names = "|".join(hook_name_pattern(k) for k in kinds)
            raise DLMScopeError(
                f"unknown hook {hook_name!r}; allowed: blocks.{{0..{self.n_layers - 1}}}.{{{names}}}"
                + (" (router sites on MoE layers only)" if self.n_experts else "")
            )
        return self.sites[hook_name]

    def layer_of(self, hook_name: str) -> int:
        self.site(hook_name)
        return site_key(hook_name)[0]

    def site_order(self, hook_name: str) -> tuple[int, int]:
        """(layer, position within the layer): sorts hook names in the order a forward pass reaches them."""
        self.site(hook_name)
        return site_key(hook_name)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits (B, L, V) for `input_ids` (B, L); `attention_mask` is 1 for real tokens.

        The model's own attention: bidirectional for LLaDA, Dream and LLaDA-MoE, causal for causal LMs, and
        **block-causal** for block-diffusion models (LLaDA 2.x: bidirectional inside each block of
        `block_size` positions from position 0, causal across blocks). `forward_bidirectional` is the
        every-position-sees-every-position view of a block model.
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            if bool(attention_mask.all()):
                attention_mask = None
        if self.call is None:
            raise DLMScopeError(f"{self.name} has no forward: it was built without `call`")
        return self.call(input_ids, attention_mask)

    __call__ = forward

    def forward_bidirectional(self, input_ids: torch.Tensor,
                              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits with full bidirectional attention, for block models too (one block spanning the input).

        Not what a block model was trained on; the same as `forward` for every other family.
        """
        if not self.block_size:
            return self.forward(input_ids, attention_mask)
        saved = self.block_size
        self.block_size = max(int(input_ids.shape[-1]), 1)
        try:
            return self.forward(input_ids, attention_mask)
        finally:
            self.block_size = saved

    def denoise_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       clean: torch.Tensor | None = None) -> torch.Tensor:
        """Logits where position i predicts token i (the shift of Dream-style models undone).

        `clean` is the uncorrupted sequence: a block-diffusion model then denoises each block of
        `input_ids` given the clean earlier blocks (its training objective, see `models.llada2`);
        models with full bidirectional attention ignore it.
        """
        if self.causal:
            raise DLMScopeError(f"{self.name} is autoregressive ({self.family}); it has no denoising logits")
        if clean is not None and self.block_size:
            from .llada2 import teacher_forced_logits

            return teacher_forced_logits(self, input_ids, clean, attention_mask)
        return self.align_logits(self.forward(input_ids, attention_mask))

    def align_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Raw logits -> position i predicts token i (position 0 keeps its own under a shift)."""
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1) if self.shift else logits

    def require_mask_id(self) -> int:
        if self.mask_id is None:
            raise DLMScopeError(
                f"model {self.name!r} has no mask token; diffusion needs one (pass load_model(..., mask_id=N), "
                "set config.mask_token_id or the tokenizer's mask_token)"
            )
        return self.mask_id

    def to_tokens(self, texts: list[str] | str, add_bos: bool = True) -> list[list[int]]:
        """Tokenise without padding; the BOS token (when the tokenizer has one) leads each text."""
        if isinstance(texts, str):
            texts = [texts]
        tok = self.tokenizer
        if tok is None:
            raise DLMScopeError(f"model {self.name!r} has no tokenizer; pass token ids instead of text")
        out = []
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if add_bos and tok.bos_token_id is not None:
                ids = [tok.bos_token_id] + ids
            out.append(ids)
        return out

    def to_text(self, ids: torch.Tensor | list[int], skip_special: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)


def _deepcopy_value(value: Any, memo: dict) -> Any:
    """deepcopy, except that a closure is rebuilt over copies of its cells (with the same memo, so the module it
    closes over becomes the copied module)."""
    if not isinstance(value, types.FunctionType) or not value.__closure__:
        return copy.deepcopy(value, memo)
    if id(value) not in memo:
        cells = tuple(types.CellType(_deepcopy_value(c.cell_contents, memo)) for c in value.__closure__)
        memo[id(value)] = types.FunctionType(value.__code__, value.__globals__, value.__name__, value.__defaults__,
                                             cells)
    return memo[id(value)]


def hf_sites(layers: list[nn.Module], mid_attr: str | None) -> dict[str, Site]:
    """TransformerLens-style hook names for a list of decoder layers.

    resid_pre reads a layer's input, resid_post its output, resid_mid the residual stream after attention,
    before the MLP: editing it changes the residual stream itself (resid_post, later layers) and what the MLP
    reads, as in TransformerLens. Native layers carry an identity `hook_resid_mid` for it (own-code layers in
    the layer, transformers layers in their `HFAttention`); other layers (remote code) fall back to the input
    of their second norm `mid_attr`, where reading is right but an edit reaches only the MLP. mlp_in and
    mlp_out are the input and output of the layer's `mlp` module: mlp_in is the NORMALISED residual the MLP
    reads (what transcoders encode; TransformerLens' hook_mlp_in is the residual before that norm, which is
    our resid_mid), mlp_out is what the MLP adds to the residual stream (as in TransformerLens).
    Layers whose attention carries `AttentionHooks` also get `attn.hook_*` and hook_attn_out (what
    attention adds to the residual stream: resid_pre + attn_out = resid_mid).
    """
    from .attention import ATTN_SITES, attention_module

    sites: dict[str, Site] = {}
    for i, layer in enumerate(layers):
        sites[f"blocks.{i}.hook_resid_pre"] = Site(layer, "input")
        attn = attention_module(layer)
        if attn is not None:
            for kind in ATTN_SITES:
                sites[f"blocks.{i}.attn.hook_{kind}"] = Site(getattr(attn.hooks, f"hook_{kind}"), "output",
                                                              pos_dim=2 if kind == "pattern" else 1)
            sites[f"blocks.{i}.hook_attn_out"] = Site(getattr(attn, "hook_attn_out", attn), "output")
        mid = getattr(layer, "hook_resid_mid", None) or getattr(attn, "hook_resid_mid", None)
        if mid is not None:
            sites[f"blocks.{i}.hook_resid_mid"] = Site(mid, "output")
        elif mid_attr is not None and hasattr(layer, mid_attr):
            sites[f"blocks.{i}.hook_resid_mid"] = Site(getattr(layer, mid_attr), "input")
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, nn.Module):
            sites[f"blocks.{i}.hook_mlp_in"] = Site(mlp, "input")
            sites[f"blocks.{i}.hook_mlp_out"] = Site(mlp, "output")
        sites[f"blocks.{i}.hook_resid_post"] = Site(layer, "output")
    return sites


def hook_name_pattern(kind: str) -> str:
    """The part of a hook name after `blocks.{i}.` for a kind of `SITE_ORDER`."""
    return hook_name(0, kind)[len("blocks.0."):]


def bidirectional_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) padding mask -> (B, 1, L, L) boolean mask where every query sees every real key."""
    keys = attention_mask.bool()[:, None, None, :]
    return keys.expand(-1, 1, attention_mask.shape[1], -1)
