"""Group rollouts with our sampler: G completions per prompt, task rewards, group advantages."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.sampler import generate, one_block
from ..models.base import LoadedModel


def group_advantages(rewards: torch.Tensor, group_size: int, normalise: bool = False) -> torch.Tensor:
    """Reward minus its group's mean, optionally divided by the group's std; exactly zero for constant groups."""
    r = rewards.view(-1, group_size).float()
    a = r - r.mean(1, keepdim=True)
    if normalise:
        a = a / (r.std(1, keepdim=True) + 1e-6)  # a constant group stays 0 / (0 + eps) = 0
    return a.flatten()


@dataclass
class Rollout:
    """One step's samples: `prompts_per_step * group_size` rows, groups contiguous."""

    seqs: torch.Tensor
    """(B, L) prompt (left-padded) + completion token ids."""
    attn: torch.Tensor
    """(B, L) attention mask (0 on left padding)."""
    completion: torch.Tensor
    """(B, L) bool, True on generated positions."""
    texts: list[str]
    rewards: torch.Tensor
    advantages: torch.Tensor
    correct: torch.Tensor
    """(B,) bool: the task's exact-correctness test."""


@torch.no_grad()
def sample_groups(lm: LoadedModel, task, examples: list, group_size: int, *, gen_length: int, steps: int,
                  temperature: float, seed: int, normalise: bool = False, schedule: str | None = None,
                  threshold: float | None = None, cache: str | None = None) -> Rollout:
    """G completions per example (one block of `gen_length`, `steps` denoising steps), scored by the task.

    `threshold` / `cache`: the sampler's fast decoding (Fast-dLLM) for the rollouts.
    """
    rows = [e for e in examples for _ in range(group_size)]
    out = generate(lm, [e.prompt for e in rows], gen_length=gen_length, steps=steps,
                         block_length=one_block(lm, gen_length),
                   temperature=temperature, seed=seed, schedule=schedule, threshold=threshold, cache=cache)
    assert out.texts is not None  # prompts were text: the tokenizer decodes too
    rewards = torch.tensor([float(task.reward(e, t)) for e, t in zip(rows, out.texts)])
    completion = torch.zeros_like(out.sequences, dtype=torch.bool)
    completion[:, out.prompt_length:] = True
    return Rollout(out.sequences.to(lm.device), out.attention_mask.to(lm.device), completion.to(lm.device), out.texts,
                   rewards, group_advantages(rewards, group_size, normalise),
                   torch.tensor([bool(task.is_correct(e, t)) for e, t in zip(rows, out.texts)]))


@torch.no_grad()
def evaluate(lm: LoadedModel, task, examples: list, *, gen_length: int, steps: int, batch_size: int = 64,
             schedule: str | None = None, threshold: float | None = None, cache: str | None = None) -> dict:
    """Greedy (temperature 0) exact accuracy, mean reward (Sudoku: cell accuracy), per-example correctness and reward."""
    correct, rewards = [], []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        texts = generate(lm, [e.prompt for e in chunk], gen_length=gen_length, steps=steps,
                         block_length=one_block(lm, gen_length),
                         schedule=schedule, threshold=threshold, cache=cache).texts
        assert texts is not None
        correct += [int(bool(task.is_correct(e, t))) for e, t in zip(chunk, texts)]
        rewards += [float(task.reward(e, t)) for e, t in zip(chunk, texts)]
    return {"accuracy": sum(correct) / len(examples), "reward": sum(rewards) / len(examples), "correct": correct,
            "rewards": rewards}
