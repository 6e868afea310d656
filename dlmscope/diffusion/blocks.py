"""LLaDA 2.x's block sampler, as a schedule and a remasking rule plugged into the shared sampler loop.

Upstream decodes block by block (blocks of the model's `block_size`, aligned to position 0, the
first being the one the prompt ends in), `steps_per_block` steps per block at most. Step i of a
block has a quota from an even split of the block size over the steps (remainder first); it
reveals every masked position whose probability of its argmax token is above `threshold` when
there are at least quota of them, else the quota best. A block ends early once full. The loop,
block alignment and the exact KV cache of finished blocks (`cache="block"`) live in
`diffusion.sampler.generate`; this module adds only the LLaDA 2.x rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import checks
from ..errors import DLMScopeError
from ..models.base import LoadedModel
from .prompts import prepare_prompts
from .remasking import Remasking, StepInput, top_n_mask
from .sampler import DenoiseStep, GenerateOutput, block_bounds, generate
from .schedules import Schedule


class BlockQuota(Schedule):
    """Step i's quota: block_size // steps, the remainder to the first steps; never more than is masked."""

    name = "block_quota"

    def __init__(self, block_size: int):
        self.block_size = block_size

    def fraction(self, i: int, steps: int) -> float:
        return self.counts(torch.tensor([self.block_size]), i, steps).item() / self.block_size

    def counts(self, n_masked: torch.Tensor, i: int, steps: int) -> torch.Tensor:
        quota = self.block_size // steps + int(i < self.block_size % steps)
        return n_masked.clamp(max=quota)


class ThresholdQuota(Remasking):
    """LLaDA 2.x: all candidates with p(x0) > threshold if they meet the step's quota, else the quota best."""

    name = "threshold_quota"

    def __init__(self, threshold: float = 0.95):
        self.threshold = threshold

    def scores(self, s: StepInput) -> torch.Tensor:
        probs = F.softmax(s.logits.float(), dim=-1)  # float32, as upstream
        return probs.gather(-1, s.x0[..., None]).squeeze(-1)

    def select(self, s: StepInput, n_transfer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = self.scores(s).masked_fill(~s.candidates, float("-inf"))
        high = s.candidates & (score > self.threshold)
        enough = high.sum(1) >= n_transfer.to(high.device)
        return score.double(), torch.where(enough[:, None], high, top_n_mask(score, n_transfer))


def check_block_options(max_new_tokens: int, steps_per_block: int, threshold: float, minimal_topk: int) -> None:
    """`generate_blocks`' counts and threshold, checked before any model loads."""
    for name, value in (("max_new_tokens", max_new_tokens), ("steps_per_block", steps_per_block),
                        ("minimal_topk", minimal_topk)):
        checks.positive(name, value)
    checks.number("threshold", threshold, 0, 1)
    if minimal_topk > max_new_tokens:
        raise DLMScopeError(f"minimal_topk={minimal_topk} is invalid; allowed: 1..max_new_tokens ({max_new_tokens})")


def generate_blocks(
    lm: LoadedModel,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int = 128,
    steps_per_block: int = 32,
    threshold: float = 0.95,
    minimal_topk: int = 1,
    temperature: float = 0.0,
    *,
    block_length: int | None = None,
    eos_early_stop: bool = False,
    cache: str | None = "block",
    callback: Callable[[DenoiseStep], None] | None = None,
    return_history: bool = False,
    seed: int | None = None,
) -> GenerateOutput:
    """LLaDA 2.x sampling (dllm `LLaDA2Sampler`): token for token the same at temperature 0.

    `steps_per_block` is capped at `max_new_tokens // minimal_topk` as upstream. `block_length` is upstream's
    block size argument (None: the model's `block_size`, 32 for released folders); the attention follows it.
    The generation runs to the end of the block holding token `max_new_tokens`, so it may be longer.
    `eos_early_stop` stops after the first finished block that holds an EOS (see `sampler.generate`).
    `cache="block"` reuses the finished blocks' keys/values (exact: attention is causal across blocks); None
    recomputes the whole sequence every step. `dlmscope.generate` on a block model runs this same sampler.
    """
    if not lm.block_size:
        raise DLMScopeError(f"{lm.name} ({lm.family}) is not a block-diffusion model; use generate()")
    check_block_options(max_new_tokens, steps_per_block, threshold, minimal_topk)
    block = lm.block_size if block_length is None else checks.positive("block_length", block_length)
    steps_per_block = min(steps_per_block, max_new_tokens // minimal_topk)
    width = prepare_prompts(lm, prompts)[0].shape[1]
    n_blocks = len(block_bounds(width, max_new_tokens, block, aligned=True))
    return generate(lm, prompts, gen_length=max_new_tokens, steps=steps_per_block * n_blocks, block_length=block,
                    temperature=temperature, threshold=threshold, cache=cache, eos_early_stop=eos_early_stop,
                    callback=callback, return_history=return_history, seed=seed)
