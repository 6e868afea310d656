"""Pretrained SAEs by name: `dlmscope/saes/registry.yaml` lists them, folders sit beside it."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..errors import DLMScopeError
from .io import load_sae_dir
from .model import SAE

REGISTRY = Path(__file__).resolve().parent.parent / "saes" / "registry.yaml"


def registry() -> dict[str, dict]:
    """name -> entry (path, model, hook, k, n_latents, description)."""
    if not REGISTRY.is_file():
        return {}
    entries = yaml.safe_load(REGISTRY.read_text()) or {}
    return {e["name"]: e for e in entries.get("saes", [])}


def load_sae(name_or_path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """A registered SAE name or an SAE folder (any supported format)."""
    entries = registry()
    name = str(name_or_path)
    if name in entries:
        path = Path(entries[name]["path"])
        return load_sae_dir(path if path.is_absolute() else REGISTRY.parent / path, device)
    if Path(name).expanduser().is_dir():
        return load_sae_dir(name, device)
    known = ", ".join(entries) or "none registered"
    raise DLMScopeError(f"unknown SAE {name!r}: not a folder and not a registered name (known: {known})")
