"""One constructor for every SAE architecture (each lives in its own module)."""

from __future__ import annotations

from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .model import SAEConfig, TopKSAE
from .transcoder import Transcoder

CLASSES = {"topk": TopKSAE, "batchtopk": TopKSAE, "jumprelu": JumpReLUSAE, "matryoshka": MatryoshkaSAE,
           "transcoder": Transcoder, "skip_transcoder": Transcoder}


def build_sae(cfg: SAEConfig, seed: int = 0) -> TopKSAE:
    """A freshly initialised SAE of `cfg.architecture` (SAEConfig has validated the name)."""
    return CLASSES[cfg.architecture](cfg, seed=seed)
