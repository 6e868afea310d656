"""Reading checkpoint folders and turning state dicts into transformers modules without hub access."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from ..errors import DLMScopeError
from .attention import hook_hf_attention
from .base import LoadedModel, bidirectional_mask, hf_sites

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ModuleT = TypeVar("ModuleT", bound=nn.Module)

log = logging.getLogger("dlmscope")

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
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DLMScopeError(f"{str(path)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict):
        raise DLMScopeError(f"{str(path)!r} is not a JSON object")
    _check_attention_shape(config, path)
    return config


def _check_attention_shape(config: dict, path: Path) -> None:
    """Heads must divide the width (unless head_dim is explicit) and key/value heads the heads."""
    width = config.get("hidden_size", config.get("d_model"))
    heads = config.get("num_attention_heads", config.get("n_heads"))
    kv = config.get("num_key_value_heads", config.get("n_kv_heads"))
    for key, value in (("width", width), ("attention heads", heads), ("key/value heads", kv)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise DLMScopeError(f"{str(path)!r}: {key} {value!r} must be a positive integer")
    if width and heads and config.get("head_dim") is None and width % heads:
        raise DLMScopeError(f"{str(path)!r}: {heads} attention heads do not divide the width {width}")
    if heads and kv and heads % kv:
        raise DLMScopeError(f"{str(path)!r}: {kv} key/value heads do not divide the {heads} attention heads")


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


def load_tokenizer(folder: Path, remote: bool = False):
    """The folder's tokenizer, or None when it ships none (token ids then have to be given).

    Native loaders never run the folder's Python code; `remote=True` (backend="remote") allows the
    tokenizer's own code and says so in a log line.
    """
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if remote:
        log.warning("backend=remote: the tokenizer may run Python code shipped in %s", folder)
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoConfig complains about model types it does not know (llada)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=remote)
    except Exception as e:  # truncated tokenizer.json, or a tokenizer that needs its own code
        text = str(e).strip()
        hint = "" if remote else "; if it needs the checkpoint's own code, load it with backend='remote'"
        raise DLMScopeError(f"cannot load the tokenizer in {str(folder)!r}: "
                            f"{text.splitlines()[0] if text else type(e).__name__}{hint}") from None
    finally:
        hf_logging.set_verbosity(before)


def build_hf_module(
    model_cls: type[PreTrainedModel],
    config,
    tensors: Iterator[tuple[str, torch.Tensor]],
    rename: Callable[[str], str],
    device: str | torch.device,
    dtype: torch.dtype,
    device_map: str | dict | None = None,
) -> PreTrainedModel:
    """Instantiate `model_cls(config)` without random init and load renamed `tensors` into it (`place`d)."""
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
    rotary = module.get_submodule("model.rotary_emb")
    with torch.device("cpu"):
        module.get_submodule("model").rotary_emb = type(rotary)(config=config)
    return place(module, device, dtype, device_map)


def place(module: ModuleT, device: str | torch.device, dtype: torch.dtype,
          device_map: str | dict | None = None) -> ModuleT:
    """Move a loaded decoder (`module.model.layers`) to `device`, or spread it with accelerate by `device_map`:
    "auto"/"balanced"/"sequential" (never splitting a layer) or {module name: device}. Eval mode."""
    if device_map is None:
        return module.to(device=device).eval()
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        layer_class = type(module.get_submodule("model.layers.0")).__name__
        device_map = infer_auto_device_map(module, no_split_module_classes=[layer_class], dtype=dtype)
    return dispatch_model(module.eval(), device_map=device_map)


def wrap_decoder(module: PreTrainedModel, *, family: str, name: str, tokenizer, mask_id: int | None,
                 shift: bool, causal: bool) -> LoadedModel:
    """LoadedModel around a transformers decoder-only LM (Llama, Qwen2, ...)."""
    stack = module.get_submodule("model.layers")
    assert isinstance(stack, nn.ModuleList), f"{type(module).__name__}.model.layers is not a ModuleList"
    layers = list(stack)
    hook_hf_attention(layers)
    if not causal:
        for layer in layers:
            setattr(layer.get_submodule("self_attn"), "is_causal", False)  # a plain attribute, not a submodule

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
