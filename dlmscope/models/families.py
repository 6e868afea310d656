"""The model-family registry: one `register_family` call per family, read by `load_model` and `detect_family`.

Loaders are named as "module:function" (relative names inside `dlmscope.models`) and imported on first use,
so importing dlmscope stays light. A new family is a loader module plus one call below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DLMScopeError


@dataclass(frozen=True)
class Family:
    """How one checkpoint family is recognised and loaded."""

    name: str
    loader: str | None
    """"module:function" (".llada:load_llada": relative to dlmscope.models) taking (folder, device, dtype, name[, device_map=]); None: not
    loadable from a folder (TransformerLens models are passed as objects)."""
    model_types: tuple[str, ...] = ()
    """config.json `model_type` values that mean this family."""
    architectures: tuple[str, ...] = ()
    """config.json `architectures` entries that mean this family (checked before model types)."""
    architecture_suffixes: tuple[str, ...] = ()
    """Endings of `architectures` entries that mean this family (checked last)."""
    device_map: bool = True
    """Whether the loader spreads a model over devices (`device_map=`)."""
    remote: bool = True
    """Whether `backend="remote"` (the checkpoint's own code) can load it."""
    schedule: str = "linear"
    """The sampler schedule its upstream uses (`diffusion.sampler.SCHEDULES`)."""
    shift: bool = False
    """Logits shifted like an AR model's (position i-1 predicts token i: Dream)."""
    causal: bool = False
    """An autoregressive model (no mask token, no denoising)."""
    moe: bool = False
    """Mixture-of-experts layers (expert counts read from the config)."""
    blocks: bool = False
    """A block-diffusion model: causal across blocks of `block_size` tokens (LLaDA 2.x)."""
    remote_mask: str = "2d"
    """The attention mask its remote code takes: "2d" as given or "bidirectional" (a 4-D boolean mask: Dream);
    block models get their block structure."""
    released_ids: dict[str, int] = field(default_factory=dict)
    """Upstream default "mask" / "eos" ids for folders that declare none (`models.ids.resolve_ids`)."""
    lens_architecture: str | None = None
    """`cfg.original_architecture` of this family's models converted by `to_hooked_transformer`, so `load_model`
    takes a converted model back into its family (None: converted models become "transformer_lens")."""
    remote_auto_class: str = "AutoModelForCausalLM"
    """transformers' auto class for folders without remote code (masked LMs: AutoModelForMaskedLM, which takes
    no `use_cache`)."""

    def load(self, folder: Path, device: Any, dtype: Any, name: str, device_map: str | dict | None = None):
        if self.loader is None:
            raise DLMScopeError(f"family {self.name!r} cannot be loaded from a folder; pass the HookedTransformer "
                                "object itself")
        if device_map is not None and not self.device_map:
            raise DLMScopeError(f"device_map is not supported for {self.name} models; load them on one device")
        module, function = self.loader.split(":")
        load = getattr(importlib.import_module(module, __package__), function)
        return load(folder, device, dtype, name, **({"device_map": device_map} if self.device_map else {}))


FAMILIES: dict[str, Family] = {}
"""Family name -> Family, in registration order."""
FALLBACK = "causal"
"""The family of a config that names no registered model type or architecture."""


def register_family(name: str, loader: str | None, **options: Any) -> Family:
    """Register a checkpoint family (`Family`'s fields as keywords)."""
    if name in FAMILIES:
        raise ValueError(f"model family {name!r} is registered twice")
    FAMILIES[name] = family = Family(name, loader, **options)
    return family


def detect_family(config: dict) -> str:
    """Family from a config.json: by an exact `architectures` entry, then `model_type`, then an architecture
    suffix, else causal (the released LLaDA-MoE config says model_type "llada": its architecture decides)."""
    model_type = str(config.get("model_type", "")).lower()
    archs = [str(a) for a in config.get("architectures") or []]
    for matches in (lambda f: any(a in f.architectures for a in archs), lambda f: model_type in f.model_types,
                    lambda f: any(a.endswith(s) for a in archs for s in f.architecture_suffixes)):
        found = next((f.name for f in FAMILIES.values() if matches(f)), None)
        if found is not None:
            return found
    if not model_type:
        raise DLMScopeError("config.json has no model_type; pass family= one of " + ", ".join(FAMILIES))
    return FALLBACK


RELEASED_MOE_IDS = {"mask": 156895, "eos": 156892}
"""LLaDA 2.0 / 2.1: `LLaDA2MoeModelLM.generate(..., eos_id=156892, mask_id=156895)` (inclusionAI's modelling code,
vendored by dllm); LLaDA-MoE shares the tokenizer: inclusionAI/dInfer decodes it with the same ids (README
"Released checkpoints")."""

register_family("llada", ".llada:load_llada", model_types=("llada",), lens_architecture="LLaDAModelLM")
register_family("dream", ".dream:load_dream", model_types=("dream",), schedule="dream", shift=True,
                remote_mask="bidirectional", lens_architecture="DreamModel")
register_family("masked_lm", ".causal:load_masked_lm", architecture_suffixes=("ForMaskedLM",), device_map=False,
                remote_auto_class="AutoModelForMaskedLM")
register_family("causal", ".causal:load_causal", causal=True)
register_family("transformer_lens", None, remote=False)
register_family("lladamoe", ".lladamoe:load_lladamoe", model_types=("lladamoe",), architectures=("LLaDAMoEModelLM",),
                moe=True, released_ids=RELEASED_MOE_IDS)
register_family("llada2", ".llada2:load_llada2", model_types=("llada2_moe",), architectures=("LLaDA2MoeModelLM",),
                moe=True, blocks=True, released_ids=RELEASED_MOE_IDS)
