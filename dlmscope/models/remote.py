"""The remote-code backend: a checkpoint's own modelling code (`trust_remote_code=True`), offline.

For checkpoints the native loaders do not know, and to cross-check them against upstream code.
The upstream LLaDA and Dream files were written for transformers 4.x; `_compat` and `_shimmed`
patch the few places where transformers 5 changed the contract, without editing the files.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import DLMScopeError
from .base import LoadedModel, bidirectional_mask, hf_sites
from .causal import _mid_attr, find_layers
from .checkpoint import load_tokenizer
from .families import FAMILIES
from .llada2 import DEFAULT_BLOCK_SIZE, block_mask

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_AUTO_KEYS = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModel")


def _default_rope(config, device=None, seq_len=None, **_):
    """transformers 4.x's "default" RoPE init (removed in 5): inverse frequencies, attention factor 1."""
    params = getattr(config, "rope_parameters", None) or {}
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
    return inv_freq, 1.0


@contextmanager
def _compat():
    """Process-wide patches needed only while remote code is imported and instantiated."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.utils import import_utils

    added_rope = "default" not in ROPE_INIT_FUNCTIONS
    if added_rope:
        ROPE_INIT_FUNCTIONS["default"] = _default_rope
    added_fx = not hasattr(import_utils, "is_torch_fx_available")  # LLaDA 2.0's file imports it (gone in 5)
    if added_fx:
        import_utils.is_torch_fx_available = lambda: False
    try:
        yield
    finally:
        if added_rope:
            ROPE_INIT_FUNCTIONS.pop("default", None)
        if added_fx:
            del import_utils.is_torch_fx_available


def _tolerant_generation_configs() -> None:
    """Remote GenerationConfig subclasses (Dream's `validate(self, is_init=False)`) reject transformers 5's keywords."""
    from transformers import GenerationConfig

    todo = list(GenerationConfig.__subclasses__())
    while todo:
        sub = todo.pop()
        todo += sub.__subclasses__()
        own = sub.__dict__.get("validate")
        if own is not None and not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(own).parameters.values()):
            setattr(sub, "validate", lambda self, *a, _own=own, **k: _own(self))


def _shimmed(cls: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """A subclass of a remote model class that satisfies transformers 5's loading contract."""
    attrs: dict = {}
    tied = getattr(cls, "_tied_weights_keys", None)
    if isinstance(tied, (list, tuple)):  # 4.x: list of tied targets; 5.x: {target: source}
        attrs["_tied_weights_keys"] = {key: "model.embed_tokens.weight" for key in tied}
    upstream_tie = cls.tie_weights
    if "missing_keys" not in inspect.signature(upstream_tie).parameters:
        attrs["tie_weights"] = lambda self, *a, **k: upstream_tie(self)

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        if "all_tied_weights_keys" not in self.__dict__:  # set by post_init, which LLaDA never calls
            self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=False)

    attrs["__init__"] = __init__
    return type(cls.__name__, (cls,), attrs)


def _reset_rotary(module: torch.nn.Module) -> None:
    """Recompute RoPE frequencies: transformers 5 leaves non-persistent buffers of remote modules
    built on the meta device uninitialised (Dream's `inv_freq` came back as garbage, logits off by ~0.2).
    Dream has `reset_parameters`; the LLaDA-MoE / LLaDA 2.x rotaries keep their `rope_init_fn`."""
    for m in module.modules():
        if "inv_freq" not in m._buffers:
            continue
        if callable(reset := getattr(m, "reset_parameters", None)):
            reset()
        elif callable(init := getattr(m, "rope_init_fn", None)):
            inv_freq, m.attention_scaling = init(m.config, m.get_buffer("inv_freq").device)
            m.inv_freq = inv_freq
            m.original_inv_freq = inv_freq


def load_remote(folder: Path, family: str, device: str | torch.device, dtype: torch.dtype, name: str | None = None,
                device_map: str | dict | None = None) -> LoadedModel:
    """Load `folder` with its own modelling code and wrap it as a `LoadedModel` of `family`."""
    import transformers
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    allowed = [f.name for f in FAMILIES.values() if f.remote]
    if family not in allowed:
        raise DLMScopeError(f"the remote backend cannot load family {family!r}; allowed: {', '.join(allowed)}")
    fam = FAMILIES[family]
    with _compat():
        try:
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
        except (OSError, ValueError, ImportError) as e:
            raise DLMScopeError(f"cannot read the remote-code config in {str(folder)!r}: {str(e).splitlines()[0]}") from None
        if not hasattr(config, "use_cache"):  # LLaDA's config loses it under transformers 5
            config.use_cache = False
        auto_map = getattr(config, "auto_map", None) or {}
        key = next((k for k in _AUTO_KEYS if k in auto_map), None)
        if key is not None:
            cls = get_class_from_dynamic_module(auto_map[key], str(folder), local_files_only=True)
        else:  # no remote code: transformers' own class for the family
            cls = getattr(transformers, fam.remote_auto_class)._model_mapping[type(config)]
        _tolerant_generation_configs()
        module = _shimmed(cls).from_pretrained(str(folder), config=config, trust_remote_code=True,
                                               local_files_only=True, dtype=dtype, device_map=device_map)
    with _compat():  # the rotary's rope_init_fn may be the "default" shim
        _reset_rotary(module)
    if device_map is None:
        module.to(device)  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) reads as unbound to mypy
    module.eval()
    layers = find_layers(module)
    shift, causal = fam.shift, fam.causal
    block_size = getattr(config, "block_size", DEFAULT_BLOCK_SIZE) if fam.blocks else None

    def call(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is not None and fam.remote_mask == "bidirectional":  # Dream takes only a 4-D boolean mask
            attention_mask = bidirectional_mask(attention_mask)
        if fam.blocks:  # upstream makes a 2-D mask token-causal: the block structure is ours to pass
            assert block_size is not None, f"{family} checkpoints have a block size"
            attention_mask = block_mask(attention_mask, input_ids.shape[1], block_size, input_ids.device)
        kwargs = {} if fam.remote_auto_class == "AutoModelForMaskedLM" else {"use_cache": False}
        out = module(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    tokenizer = load_tokenizer(folder, remote=True)
    mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None and tokenizer is not None and not causal:
        mask_id = tokenizer.mask_token_id
    text_config = config.get_text_config()
    d_model = getattr(text_config, "hidden_size", None) or getattr(text_config, "d_model")
    # LLaDA's logits have embedding_size entries (padded vocabulary), not vocab_size
    vocab_size = getattr(text_config, "embedding_size", None) or text_config.vocab_size
    n_experts = getattr(text_config, "num_experts", None) if fam.moe else None
    return LoadedModel(module=module, tokenizer=tokenizer, family=family, mask_id=None if causal else mask_id,
                       shift=shift, causal=causal, layers=layers, d_model=d_model, vocab_size=vocab_size,
                       name=name or folder.name, sites=hf_sites(layers, _mid_attr(layers[0])), call=call,
                       n_experts=n_experts, n_active_experts=getattr(text_config, "num_experts_per_tok", None)
                       if n_experts else None, block_size=block_size)
