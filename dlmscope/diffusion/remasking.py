"""Remasking strategies: which masked positions a denoising step reveals, given the schedule's count.

A strategy scores the candidates (or, like Dream's `origin`, picks them itself); the best `n` are
revealed, or with `alg_temp` drawn from a softmax over the scores. Fast-dLLM's threshold decoding
reveals every candidate whose confidence clears the threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import checks
from ..errors import DLMScopeError
from ..models.base import LoadedModel
from .sampling import TokenSampling
from .schedules import LinearSchedule, Schedule


@dataclass
class StepInput:
    """What a remasking strategy sees when choosing positions to unmask."""

    lm: LoadedModel
    x: torch.Tensor
    logits: torch.Tensor  # aligned, after CFG, before Gumbel noise
    x0: torch.Tensor
    candidates: torch.Tensor  # (B, L) bool: masked positions inside the current block
    step: int
    n_steps: int
    step_in_block: int
    steps_per_block: int
    generator: torch.Generator | None
    sampling: TokenSampling = field(default_factory=TokenSampling)
    schedule: Schedule = field(default_factory=LinearSchedule)
    alg_temp: float | None = None  # > 0: draw positions from softmax(scores / alg_temp) instead of the top n


class Remasking:
    """Scores masked positions; the loop unmasks the `n` best of each row. Subclass to add a strategy."""

    name = "base"
    ranks = True  # False: the strategy picks positions itself and has no confidence to threshold

    def begin(self, lm: LoadedModel, x: torch.Tensor) -> None:
        """Called once before the first step (set up hooks, state)."""

    def end(self) -> None:
        """Called once after the last step, also on error."""

    def scores(self, s: StepInput) -> torch.Tensor:
        raise NotImplementedError

    def select(self, s: StepInput, n_transfer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (scores, transfer mask) with exactly `n_transfer[b]` candidates picked in row b."""
        score = self.scores(s).to(torch.float64).masked_fill(~s.candidates, float("-inf"))
        if s.alg_temp:
            return score, sample_n_mask(score, n_transfer, s.alg_temp, s.generator)
        return score, top_n_mask(score, n_transfer)

    def threshold_scores(self, s: StepInput) -> torch.Tensor:
        """The confidence Fast-dLLM's threshold compares, in [0, 1]: the scores themselves by default."""
        return self.scores(s)

    def select_above(self, s: StepInput, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast-dLLM threshold decoding: every candidate with confidence >= threshold, and each row's best."""
        score = self.threshold_scores(s).to(torch.float64).masked_fill(~s.candidates, float("-inf"))
        best = top_n_mask(score, s.candidates.any(1).long())
        return score, best | (s.candidates & (score >= threshold))


def top_n_mask(score: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(B, L) bool with the n[b] highest scores of row b set."""
    transfer = torch.zeros_like(score, dtype=torch.bool)
    k_max = int(n.max())
    if k_max > 0:
        idx = torch.topk(score, k_max, dim=1).indices
        keep = torch.arange(k_max, device=score.device)[None] < n.to(score.device)[:, None]
        transfer.scatter_(1, idx, keep)
    return transfer


def sample_n_mask(score: torch.Tensor, n: torch.Tensor, alg_temp: float, generator: torch.Generator | None) -> torch.Tensor:
    """n[b] positions of row b drawn without replacement from softmax(score / alg_temp) (Dream's `alg_temp`).

    Gumbel-top-k: the top n of score / alg_temp + Gumbel noise is such a draw, and never runs out of
    positions when the softmax underflows.
    """
    u = torch.rand(score.shape, generator=generator, dtype=torch.float64).to(score.device)
    return top_n_mask(score / alg_temp - torch.log(-torch.log(u)), n)


class LowConfidence(Remasking):
    """LLaDA `low_confidence`: the highest softmax(logits)[x0] first (untempered probabilities)."""

    name = "low_confidence"

    def scores(self, s: StepInput) -> torch.Tensor:
        # softmax(logits)[x0] without materialising the distribution
        logits = s.logits.float()
        return torch.exp(torch.gather(logits, -1, s.x0[..., None]).squeeze(-1) - torch.logsumexp(logits, -1))

    def threshold_scores(self, s: StepInput) -> torch.Tensor:
        """Fast-dLLM's confidence, a float64 softmax (precision decides near the threshold); candidates only."""
        out = torch.full(s.x.shape, float("-inf"), dtype=torch.float64, device=s.x.device)
        if s.candidates.any():
            probs = F.softmax(s.logits[s.candidates].double(), dim=-1)
            out[s.candidates] = probs.gather(-1, s.x0[s.candidates][:, None]).squeeze(-1)
        return out


class RandomOrder(Remasking):
    """LLaDA `random`: uniform float32 scores over the whole sequence, one draw per step as upstream."""

    name = "random"

    def scores(self, s: StepInput) -> torch.Tensor:
        return torch.rand(s.x.shape, generator=s.generator, dtype=torch.float32).to(s.x.device)


class DreamConfidence(Remasking):
    """Dream's scored algorithms: a confidence of Dream's sampling distribution at each candidate.

    That distribution is the tempered, top-p / top-k filtered softmax (`TokenSampling.distribution_logits`),
    computed only at candidate positions, in float32 as upstream.
    """

    def confidence(self, probs: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, s: StepInput) -> torch.Tensor:
        out = torch.full(s.x.shape, float("-inf"), dtype=torch.float64, device=s.x.device)
        if s.candidates.any():
            probs = F.softmax(s.sampling.distribution_logits(s.logits[s.candidates]), dim=-1)
            out[s.candidates] = self.confidence(probs, s.x0[s.candidates]).double()
        return out


class MaskgitPlus(DreamConfidence):
    """Dream `maskgit_plus`: the probability of the drawn token under the tempered, filtered distribution."""

    name = "maskgit_plus"

    def confidence(self, probs: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return probs.gather(-1, x0[:, None]).squeeze(-1)


class TopKMargin(DreamConfidence):
    """Dream `topk_margin`: the gap between the two largest probabilities."""

    name = "topk_margin"

    def confidence(self, probs: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        top2 = torch.topk(probs, 2, dim=-1).values
        return top2[:, 0] - top2[:, 1]


class Entropy(DreamConfidence):
    """Dream `entropy`: negative entropy sum p log(p + 1e-10), lowest entropy first."""

    name = "entropy"

    def confidence(self, probs: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (probs * torch.log(probs + 1e-10)).sum(-1)

    def threshold_scores(self, s: StepInput) -> torch.Tensor:
        return self.scores(s).exp()  # exp(-entropy): 1 for a certain prediction


class Origin(Remasking):
    """Dream `origin`: each candidate is revealed with probability `schedule.fraction` (1 - s/t under `dream`).

    One float32 uniform per candidate per step, in row-major order over the batch, as upstream draws
    them, so a generator seeded like upstream's global one reveals the same positions. The scores
    reported are those uniforms.
    """

    name = "origin"
    ranks = False

    def scores(self, s: StepInput) -> torch.Tensor:
        u = torch.rand(int(s.candidates.sum()), generator=s.generator, dtype=torch.float32).to(s.x.device)
        return torch.full(s.x.shape, float("-inf"), dtype=torch.float32, device=s.x.device).masked_scatter(s.candidates, u)

    def select(self, s: StepInput, n_transfer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = self.scores(s)
        frac = s.schedule.fraction(s.step_in_block, s.steps_per_block)
        frac = frac.to(score.device) if isinstance(frac, torch.Tensor) else frac
        return score.double(), s.candidates & (score < frac)


REMASKING: dict[str, Callable[[], Remasking]] = {
    "low_confidence": LowConfidence, "random": RandomOrder,
    "maskgit_plus": MaskgitPlus, "topk_margin": TopKMargin, "entropy": Entropy, "origin": Origin,
}


def get_remasking(strategy: str | Remasking) -> Remasking:
    if isinstance(strategy, Remasking):
        return strategy
    if strategy not in REMASKING:
        raise DLMScopeError(f"unknown remasking strategy {strategy!r}; allowed: {', '.join(REMASKING)}")
    return REMASKING[strategy]()


def check_threshold(threshold: float | None, strategy: Remasking | None = None) -> None:
    if threshold is None:
        return
    checks.number("threshold", threshold, 0, 1, low_open=True)
    if strategy is not None and not strategy.ranks:
        raise DLMScopeError(f"threshold decoding needs a strategy that scores positions; {strategy.name!r} picks "
                            "them at random by itself")
