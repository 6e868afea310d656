"""`load_model`: one entry point for every checkpoint family."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import checks
from ..errors import DLMScopeError
from .base import ForwardState, LoadedModel, Site
from .checkpoint import read_config, resolve_dtype
from .families import FAMILIES, detect_family, register_family
from .ids import check_overrides, resolve_ids
from .verify import check_loaded, check_model_type, check_weight_files
from .zoo import BUILTIN, DEFAULT_AR_MODEL, DEFAULT_MODEL, builtin_path

BACKENDS = ("native", "remote")
"""native: our loaders (no remote code); remote: the checkpoint's own code with transformers-5 shims."""


def load_model(
    path_or_name: str | Path | object,
    family: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    backend: str = "native",
    device_map: str | dict | None = None,
    mask_id: int | None = None,
    *,
    pad_id: int | None = None,
    eos_id: int | None = None,
    block_size: int | None = None,
) -> LoadedModel:
    """Load a built-in name, a local checkpoint folder, or a `HookedTransformer` as a `LoadedModel`.

    Nothing is downloaded: folders must hold config.json and safetensors weights. `backend="remote"`
    runs the folder's own modelling code (`trust_remote_code`); `device_map` is passed to transformers
    for causal and remote loads and to accelerate for the native MoE loaders (big checkpoints over several devices).
    `mask_id`, `pad_id`, `eos_id` override the ids the folder declares (else the family's upstream defaults,
    `models.ids`); `block_size` is a block-diffusion model's block length (LLaDA 2.x: 32 unless the config says).
    A bidirectional `HookedTransformer` (`to_hooked_transformer`) comes back as a diffusion model with
    `mask_id` (default: its tokenizer's mask token).
    """
    if isinstance(path_or_name, LoadedModel):
        return path_or_name
    if type(path_or_name).__name__ == "HookedTransformer":
        from .lens import wrap_transformer_lens

        return _checked(wrap_transformer_lens(path_or_name, mask_id=mask_id))
    if family is not None and family not in FAMILIES:
        raise DLMScopeError(f"unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
    if backend not in BACKENDS:
        raise DLMScopeError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    torch_dtype = resolve_dtype(dtype)
    check_overrides(mask_id=mask_id, pad_id=pad_id, eos_id=eos_id)
    if block_size is not None:
        checks.integer("block_size", block_size, 1)
    name = str(path_or_name)
    folder = builtin_path(name) if name in BUILTIN else Path(name).expanduser()
    if not folder.is_dir():
        raise DLMScopeError(
            f"model {name!r} is neither a checkpoint folder nor a built-in model ({', '.join(BUILTIN)})"
        )
    config = read_config(folder)
    family = family or detect_family(config)
    check_weight_files(folder)
    check_model_type(config, family, folder)
    if block_size is not None and not FAMILIES[family].blocks:
        blocky = ", ".join(f.name for f in FAMILIES.values() if f.blocks)
        raise DLMScopeError(f"block_size={block_size} is invalid for a {family} checkpoint: only block-diffusion "
                            f"models ({blocky}) have a block length")
    lm = _load_family(folder, config, family, device, torch_dtype, name if name in BUILTIN else folder.name,
                      backend, device_map)
    if block_size is not None:
        lm.block_size = block_size
    return _checked(resolve_ids(lm, config, mask_id, pad_id, eos_id))


def _checked(lm: LoadedModel) -> LoadedModel:
    """A loaded model whose mask id lies inside its vocabulary and whose weights are finite (`check_loaded`)."""
    check_loaded(lm)
    return lm


def _load_family(folder: Path, config: dict, family: str, device, torch_dtype, display: str, backend: str,
                 device_map) -> LoadedModel:
    if backend == "remote":
        from .remote import load_remote

        return load_remote(folder, family, device, torch_dtype, display, device_map=device_map)
    return FAMILIES[family].load(folder, device, torch_dtype, display, device_map=device_map)


__all__ = ["load_model", "LoadedModel", "ForwardState", "Site", "FAMILIES", "BUILTIN", "DEFAULT_MODEL",
           "DEFAULT_AR_MODEL", "detect_family", "register_family"]
