"""Reading checkpoint folders and turning state dicts into transformers modules without hub access."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import DLMScopeError
from .base import LoadedModel, bidirectional_mask, hf_sites

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DLMScopeError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise DLMScopeError(f"no config.json in {str(folder)!r}; a checkpoint folder needs one")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DLMScopeError(f"{str(path)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from `model.safetensors` or the shards of `model.safetensors.index.json`."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        if not found:
            raise DLMScopeError(f"no safetensors weights in {str(folder)!r} (expected model.safetensors or an index)")
        files = found
    for name in files:
        try:
            with safe_open(str(folder / name), framework="pt") as f:
                tensors = [(key, f.get_tensor(key)) for key in f.keys()]
        except Exception as e:  # truncated or corrupt file: safetensors raises several types
            raise DLMScopeError(f"cannot read weights file {str(folder / name)!r}: {e}") from None
        yield from tensors


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it ships none (token ids then have to be given)."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()  # AutoConfig complains about model types it does not know (llada)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # remote-code tokenizers: try again allowing the folder's own code
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=True)
    finally:
        logging.set_verbosity(before)


def build_hf_module(
    model_cls: type[nn.Module],
    config,
    tensors: Iterator[tuple[str, torch.Tensor]],
    rename: Callable[[str], str],
    device: str | torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """Instantiate `model_cls(config)` without random init and load renamed `tensors` into it."""
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        module = model_cls(config)
    state = {rename(k): v.to(dtype=dtype) for k, v in tensors}
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise DLMScopeError(
            f"checkpoint does not match a {model_cls.__name__}: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    module.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        module.tie_weights()
    # Buffers (rotary frequencies) were created on meta: rebuild them for real.
    rotary = module.model.rotary_emb
    with torch.device("cpu"):
        module.model.rotary_emb = type(rotary)(config=config)
    module.to(device=device)
    module.eval()
    return module


def wrap_decoder(module: nn.Module, *, family: str, name: str, tokenizer, mask_id: int | None,
                 shift: bool, causal: bool) -> LoadedModel:
    """LoadedModel around a transformers decoder-only LM (Llama, Qwen2, ...)."""
    layers = list(module.model.layers)
    if not causal:
        for layer in layers:
            layer.self_attn.is_causal = False

    def call(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is not None and not causal:
            attention_mask = bidirectional_mask(attention_mask)
        return module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def kv_call(input_ids, attention_mask, position_ids, past):
        if attention_mask.dim() == 2:
            attention_mask = None if bool(attention_mask.all()) else bidirectional_mask(attention_mask)
        out = module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=past, use_cache=past is None)
        return out.logits, out.past_key_values

    return LoadedModel(
        module=module, tokenizer=tokenizer, family=family, mask_id=mask_id, shift=shift, causal=causal,
        layers=layers, d_model=module.config.hidden_size, vocab_size=module.config.vocab_size, name=name,
        sites=hf_sites(layers, "post_attention_layernorm"), call=call, kv_call=None if causal else kv_call,
    )
