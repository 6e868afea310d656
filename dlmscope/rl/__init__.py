"""RL post-training for masked diffusion LMs: RSPO and the diffu-GRPO baseline."""

from .losses import elbo_draws, elbo_logp, grpo_loss, one_step_input, rspo_loss, token_logp
from .rollout import Rollout, evaluate, group_advantages, sample_groups
from .trainer import ALGORITHMS, RLConfig, train_rl

__all__ = ["ALGORITHMS", "RLConfig", "Rollout", "train_rl", "sample_groups", "evaluate", "group_advantages",
           "rspo_loss", "elbo_draws", "elbo_logp", "grpo_loss", "one_step_input", "token_logp"]
