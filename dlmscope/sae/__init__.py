"""Sparse autoencoders (Top-K, BatchTopK, JumpReLU, Matryoshka, transcoders): models, trainer, metrics, files, registry."""

from .family import build_sae
from .io import load_sae_dir, save_sae
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .metrics import evaluate_sae, explained_variance, fvu
from .model import SAEConfig, SAEOutput, TopKSAE
from .registry import load_sae, registry
from .train import SAETrainer, TrainConfig
from .transcoder import Transcoder

__all__ = ["SAEConfig", "SAEOutput", "TopKSAE", "JumpReLUSAE", "MatryoshkaSAE", "Transcoder", "build_sae", "SAETrainer", "TrainConfig", "save_sae", "load_sae", "load_sae_dir",
           "registry", "evaluate_sae", "fvu", "explained_variance"]
