"""RL post-training for masked diffusion LMs: RSPO, SPG and the diffu-GRPO baseline (optionally with LoRA)."""

from .losses import (elbo_draws, elbo_logp, grpo_loss, one_step_input, rspo_loss, spg_logp, spg_loss, spg_masks,
                     token_logp)
from .rollout import Rollout, evaluate, group_advantages, sample_groups
from .trainer import ALGORITHMS, RLConfig, RLRun, train_rl

__all__ = ["ALGORITHMS", "RLConfig", "RLRun", "Rollout", "train_rl", "sample_groups", "evaluate", "group_advantages",
           "rspo_loss", "spg_logp", "spg_loss", "spg_masks", "elbo_draws", "elbo_logp", "grpo_loss", "one_step_input", "token_logp"]
