"""Models transformers already runs: autoregressive baselines and BERT-style masked LMs (TransformerLens: `lens`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DLMScopeError
from .attention import hook_hf_attention
from .base import LoadedModel, hf_sites

_LAYER_PATHS = ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                "bert.encoder.layer", "roberta.encoder.layer", "distilbert.transformer.layer", "encoder.layer",
                "model.transformer.blocks")
_MID_NAMES = ("post_attention_layernorm", "ln_2", "mlp_norm", "ff_norm")


def find_layers(module: nn.Module) -> list[nn.Module]:
    for path in _LAYER_PATHS:
        obj: Any = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    raise DLMScopeError(f"cannot find the transformer layers of {type(module).__name__}; tried {', '.join(_LAYER_PATHS)}")


def _mid_attr(layer: nn.Module) -> str | None:
    return next((n for n in _MID_NAMES if hasattr(layer, n)), None)


def load_causal(folder: Path, device: str | torch.device, dtype: torch.dtype, name: str | None = None,
                device_map: str | dict | None = None) -> LoadedModel:
    """Any `AutoModelForCausalLM` folder as an autoregressive baseline (next-token logits)."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from .checkpoint import load_tokenizer

    module: PreTrainedModel = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype,
                                                                   device_map=device_map)
    if device_map is None:
        module.to(device)  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) reads as unbound to mypy
    module.eval()
    layers = find_layers(module)
    hook_hf_attention(layers)

    def call(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    cfg = module.config
    return LoadedModel(module=module, tokenizer=load_tokenizer(folder), family="causal", mask_id=None, shift=False,
                       causal=True, layers=layers, d_model=cfg.get_text_config().hidden_size,
                       vocab_size=module.get_output_embeddings().weight.shape[0], name=name or folder.name,
                       sites=hf_sites(layers, _mid_attr(layers[0])), call=call)


def load_masked_lm(folder: Path, device: str | torch.device, dtype: torch.dtype, name: str | None = None) -> LoadedModel:
    """A BERT-style masked LM: trained with random mask ratios it is a masked diffusion LM."""
    from transformers import AutoModelForMaskedLM

    from .checkpoint import load_tokenizer

    module = AutoModelForMaskedLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(folder)
    mask_id = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
    layers = find_layers(module)

    def call(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return module(input_ids=input_ids, attention_mask=attention_mask).logits

    return LoadedModel(module=module, tokenizer=tokenizer, family="masked_lm", mask_id=mask_id, shift=False,
                       causal=False, layers=layers, d_model=module.config.hidden_size,
                       vocab_size=module.get_output_embeddings().weight.shape[0], name=name or folder.name,
                       sites=hf_sites(layers, None), call=call)
