"""LoRA for RL runs, via the peft library (the optional `rl` extra).

Adapters are injected in place (`peft.inject_adapter_in_model`), so the `LoadedModel` wrapper, its
hooks and the sampler keep working on the same module; only adapter weights train. A checkpoint is
both the merged model (a plain LLaDA folder `load_model` reads) and the adapters in PEFT's own layout
(`adapter_config.json`, `adapter_model.safetensors`: `PeftModel.from_pretrained` applies them to the base).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..errors import DLMScopeError
from ..io_utils import atomic_save_safetensors, atomic_write_text


def _peft():
    try:
        import peft
    except ImportError:
        raise DLMScopeError("LoRA needs the peft library: pip install 'dlmscope[rl]'") from None
    return peft


def _names(targets: str) -> list[str]:
    return [t.strip() for t in targets.split(",") if t.strip()]


def _targets(module: torch.nn.Module, targets: str) -> list[str]:
    names = _names(targets)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [t for t in names if t not in linear]
    if not names or missing:
        raise DLMScopeError(f"LoRA targets {missing or targets!r} match no linear layer; allowed: {', '.join(linear)}")
    return names


def add_adapters(module: torch.nn.Module, r: int, alpha: float, targets: str) -> torch.nn.Module:
    """Wrap the named linear layers with rank-r adapters (B = 0, so the model is unchanged) and freeze the rest."""
    peft = _peft()
    names = _targets(module, targets)
    peft.inject_adapter_in_model(peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=names, lora_dropout=0.0), module)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return module


def adapter_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under their in-module names."""
    return {k: v for k, v in module.state_dict().items() if "lora_" in k}


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], partial: bool) -> None:
    """Load a full state dict, or (partial) exactly the adapter tensors; RuntimeError on any mismatch."""
    if not partial:
        module.load_state_dict(state)
        return
    if set(state) != set(adapter_state(module)):
        raise RuntimeError("adapter keys differ")
    module.load_state_dict(state, strict=False)


def merged(module: torch.nn.Module) -> torch.nn.Module:
    """A copy with every adapter folded into its base weight and removed: the plain architecture again."""
    from peft.tuners.lora import LoraLayer

    plain = copy.deepcopy(module)
    for name, m in list(plain.named_modules()):
        if isinstance(m, LoraLayer):
            m.merge()
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, m.get_base_layer())
    return plain


def plain_state(module: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """The state dict of the plain (merged) model, with or without adapters in `module`."""
    return merged(module).state_dict() if lora else module.state_dict()


def save_adapter(module: torch.nn.Module, folder: str | Path, r: int, alpha: float, targets: str,
                 base: str) -> Path:
    """PEFT's adapter layout: adapter_config.json + adapter_model.safetensors (keys base_model.model.<name>)."""
    peft = _peft()
    folder = Path(folder)
    tensors = {f"base_model.model.{k}": v.detach().contiguous()
               for k, v in peft.get_peft_model_state_dict(module).items()}
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=_names(targets), lora_dropout=0.0,
                             base_model_name_or_path=base, task_type="CAUSAL_LM").to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    atomic_save_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2, default=str) + "\n")
    return folder
