"""`load_model`: one entry point for every checkpoint family."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DLMScopeError
from .base import FAMILIES, ForwardState, LoadedModel, Site
from .checkpoint import read_config, resolve_dtype
from .zoo import BUILTIN, DEFAULT_AR_MODEL, DEFAULT_MODEL, builtin_path

BACKENDS = ("native", "remote")
"""native: our loaders (no remote code); remote: the checkpoint's own code with transformers-5 shims."""


_MOE_FAMILIES = {"lladamoe": "lladamoe", "LLaDAMoEModelLM": "lladamoe", "llada2_moe": "llada2",
                 "LLaDA2MoeModelLM": "llada2"}
"""model_type or architecture -> MoE family; the released LLaDA-MoE config says model_type "llada"."""


def detect_family(config: dict) -> str:
    """Family from a config.json: MoE DLMs by architecture or model_type, LLaDA and Dream by model_type,
    masked LMs by architecture, else causal."""
    model_type = str(config.get("model_type", "")).lower()
    for key in [*(config.get("architectures") or []), model_type]:
        if key in _MOE_FAMILIES:
            return _MOE_FAMILIES[key]
    if model_type == "llada":
        return "llada"
    if model_type == "dream":
        return "dream"
    if any(a.endswith("ForMaskedLM") for a in config.get("architectures") or []):
        return "masked_lm"
    if not model_type:
        raise DLMScopeError("config.json has no model_type; pass family= one of " + ", ".join(FAMILIES))
    return "causal"


def load_model(
    path_or_name: str | Path | object,
    family: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    backend: str = "native",
    device_map: str | dict | None = None,
    mask_id: int | None = None,
) -> LoadedModel:
    """Load a built-in name, a local checkpoint folder, or a `HookedTransformer` as a `LoadedModel`.

    Nothing is downloaded: folders must hold config.json and safetensors weights. `backend="remote"`
    runs the folder's own modelling code (`trust_remote_code`); `device_map` is passed to transformers
    for causal and remote loads and to accelerate for the native MoE loaders (big checkpoints over several devices).
    A bidirectional `HookedTransformer` (`to_hooked_transformer`) comes back as a diffusion model with
    `mask_id` (default: its tokenizer's mask token).
    """
    if isinstance(path_or_name, LoadedModel):
        return path_or_name
    if type(path_or_name).__name__ == "HookedTransformer":
        from .lens import wrap_transformer_lens

        return wrap_transformer_lens(path_or_name, mask_id=mask_id)
    if mask_id is not None:
        raise DLMScopeError("mask_id= is for a HookedTransformer; a checkpoint folder's mask id comes from its config")
    if family is not None and family not in FAMILIES:
        raise DLMScopeError(f"unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
    if backend not in BACKENDS:
        raise DLMScopeError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    torch_dtype = resolve_dtype(dtype)
    name = str(path_or_name)
    folder = builtin_path(name) if name in BUILTIN else Path(name).expanduser()
    if not folder.is_dir():
        raise DLMScopeError(
            f"model {name!r} is neither a checkpoint folder nor a built-in model ({', '.join(BUILTIN)})"
        )
    config = read_config(folder)
    family = family or detect_family(config)
    display = name if name in BUILTIN else folder.name
    if backend == "remote":
        from .remote import load_remote

        return load_remote(folder, family, device, torch_dtype, display, device_map=device_map)
    if family == "llada":
        from .llada import load_llada

        return load_llada(folder, device, torch_dtype, display, device_map=device_map)
    if family == "lladamoe":
        from .lladamoe import load_lladamoe

        return load_lladamoe(folder, device, torch_dtype, display, device_map=device_map)
    if family == "llada2":
        from .llada2 import load_llada2

        return load_llada2(folder, device, torch_dtype, display, device_map=device_map)
    if family == "dream":
        from .dream import load_dream

        return load_dream(folder, device, torch_dtype, display, device_map=device_map)
    if family == "masked_lm":
        if device_map is not None:
            raise DLMScopeError("device_map is not supported for masked_lm models; load them on one device")
        from .causal import load_masked_lm

        return load_masked_lm(folder, device, torch_dtype, display)
    if family == "causal":
        from .causal import load_causal

        return load_causal(folder, device, torch_dtype, display, device_map=device_map)
    raise DLMScopeError(f"family {family!r} cannot be loaded from a folder; pass the HookedTransformer object itself")


__all__ = ["load_model", "LoadedModel", "ForwardState", "Site", "FAMILIES", "BUILTIN", "DEFAULT_MODEL",
           "DEFAULT_AR_MODEL", "detect_family"]
