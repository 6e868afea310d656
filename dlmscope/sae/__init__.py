"""Sparse autoencoders (Top-K, BatchTopK, JumpReLU, Matryoshka, transcoders): models, trainer, metrics, files, registry.

Each architecture module registers its class (`model.register_architecture`); importing it here fills
`ARCHITECTURES` before any config is built.
"""

from .batchtopk import BatchTopKSAE
from .family import build_sae
from .io import load_sae_dir, save_sae
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .metrics import evaluate_sae, explained_variance, fvu
from .model import ARCHITECTURES, SAE, SAEConfig, SAEOutput
from .registry import load_sae, registry
from .saelens import from_sae_lens, to_sae_lens
from .train import SAETrainer, TrainConfig
from .transcoder import SkipTranscoder, Transcoder

__all__ = ["SAEConfig", "SAEOutput", "SAE", "BatchTopKSAE", "JumpReLUSAE", "MatryoshkaSAE", "Transcoder",
           "SkipTranscoder", "ARCHITECTURES", "build_sae", "SAETrainer", "TrainConfig", "save_sae", "load_sae",
           "load_sae_dir", "registry", "to_sae_lens", "from_sae_lens", "evaluate_sae", "fvu", "explained_variance"]
