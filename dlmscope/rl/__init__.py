"""RL post-training for masked diffusion LMs: RSPO and the diffu-GRPO baseline."""

from .losses import group_advantages, rspo_loss
from .trainer import RLConfig, train_rl

__all__ = ["RLConfig", "train_rl", "rspo_loss", "group_advantages"]
