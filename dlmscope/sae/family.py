"""One constructor for every SAE architecture (each module registers its class; `dlmscope.sae` imports them all)."""

from __future__ import annotations

from .model import ARCHITECTURES, SAE, SAEConfig


def build_sae(cfg: SAEConfig, seed: int = 0) -> SAE:
    """A freshly initialised SAE of `cfg.architecture` (SAEConfig has validated the name)."""
    return ARCHITECTURES[cfg.architecture](cfg, seed=seed)
