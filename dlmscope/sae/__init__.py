"""Top-K sparse autoencoders: model, trainer, metrics, files, registry."""

from .io import load_sae_dir, save_sae
from .metrics import evaluate_sae, explained_variance, fvu
from .model import SAEConfig, SAEOutput, TopKSAE
from .registry import load_sae, registry
from .train import SAETrainer, TrainConfig

__all__ = ["SAEConfig", "SAEOutput", "TopKSAE", "SAETrainer", "TrainConfig", "save_sae", "load_sae", "load_sae_dir",
           "registry", "evaluate_sae", "fvu", "explained_variance"]
