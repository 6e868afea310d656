"""The denoising sampler: a block loop with a pluggable schedule and pluggable remasking strategies.

Three small objects split the work of one step, so each can be swapped on its own:
- a `Schedule` says how many of a block's masked positions a step reveals (`linear`: LLaDA's
  even split, remainder first; `dream`: Dream's `int(n * (1 - s/t))` on `linspace(1, eps, steps + 1)`);
- a `TokenSampling` draws the predicted tokens x0 (temperature, Dream's top-p / top-k);
- a `Remasking` strategy scores the candidates (or, for Dream's `origin`, picks them itself); the
  best `n` are revealed, or with `alg_temp` drawn from a softmax over the scores, never remasked.
Everything that happens "during diffusion" (activation capture, steering, SAE-informed ordering)
is a hook or a strategy plugged into this loop, which also keeps `lm.state` current so hooks know
the step and the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import checks
from ..errors import DLMScopeError
from ..models.base import ForwardState, LoadedModel
from ..models.kvcache import BlockKVCache, check_cache


class Schedule:
    """How many still-masked positions of a block step `i` of `steps` reveals. Subclass to add one."""

    name = "base"

    def default_block_length(self, gen_length: int) -> int:
        """Block length when the caller gives none: 32 when it divides the generation, else one block."""
        return 32 if gen_length % 32 == 0 else gen_length

    def fraction(self, i: int, steps: int) -> float | torch.Tensor:
        """Share of the still-masked positions step i reveals (`origin` reveals each with this probability)."""
        raise NotImplementedError

    def counts(self, n_masked: torch.Tensor, i: int, steps: int) -> torch.Tensor:
        """(B,) positions to reveal at step i, given the (B,) masked counts before it."""
        raise NotImplementedError

    def plan(self, n_masked: torch.Tensor, steps: int) -> torch.Tensor:
        """(B, steps) counts when every step reveals exactly what it is told."""
        out, left = [], n_masked.clone()
        for i in range(steps):
            out.append(self.counts(left, i, steps))
            left = left - out[-1]
        return torch.stack(out, 1)


class LinearSchedule(Schedule):
    """LLaDA: n // steps per step, the remainder to the first steps (as ceil(left / steps left))."""

    name = "linear"

    def fraction(self, i: int, steps: int) -> float:
        return 1.0 / (steps - i)

    def counts(self, n_masked: torch.Tensor, i: int, steps: int) -> torch.Tensor:
        k = steps - i
        return (n_masked + k - 1) // k


class DreamSchedule(Schedule):
    """Dream `diffusion_generate`: t = linspace(1, eps, steps + 1); step i reveals int(n * (1 - t[i+1]/t[i])).

    Computed in float32 as upstream does (the truncation depends on it); the last step reveals the rest.
    Dream has no blocks, so by default the whole generation is one block.
    """

    name = "dream"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def default_block_length(self, gen_length: int) -> int:
        return gen_length

    def fraction(self, i: int, steps: int) -> float | torch.Tensor:
        if i == steps - 1:
            return 1.0
        t = torch.linspace(1, self.eps, steps + 1, dtype=torch.float32)
        return 1 - t[i + 1] / t[i]

    def counts(self, n_masked: torch.Tensor, i: int, steps: int) -> torch.Tensor:
        if i == steps - 1:
            return n_masked.clone()
        frac = self.fraction(i, steps).to(n_masked.device)
        return (n_masked.to(torch.float32) * frac).long()


SCHEDULES: dict[str, Callable[..., Schedule]] = {"linear": LinearSchedule, "dream": DreamSchedule}


def default_schedule(lm: LoadedModel) -> str:
    """Each family samples as its own upstream does (its registration's `schedule`: Dream `dream`, others `linear`)."""
    from ..models.families import FAMILIES

    family = FAMILIES.get(lm.family)
    return family.schedule if family is not None else "linear"


def family_sampler(lm: LoadedModel, remasking: str | Remasking | None, schedule: str | Schedule | None, eps: float,
                   threshold: float | None, block_length: int | None) -> tuple[Remasking, Schedule, float | None]:
    """(strategy, schedule, Fast-dLLM threshold): what the caller names, else the checkpoint family's own.

    LLaDA and LLaDA-MoE: `linear` + `low_confidence`; Dream: `dream` + `low_confidence`; LLaDA 2.x: its block
    sampler (`diffusion.blocks`: a per-block quota, and `threshold` is its own, 0.95 by default).
    """
    if lm.block_size:
        from .blocks import BlockQuota, ThresholdQuota  # blocks builds on this module

        sched = BlockQuota(block_length) if schedule is None else get_schedule(schedule, eps)
        if remasking is None:
            level = 0.95 if threshold is None else checks.number("threshold", threshold, 0, 1)
            return ThresholdQuota(level), sched, None
        return get_remasking(remasking), sched, threshold
    sched = get_schedule(default_schedule(lm) if schedule is None else schedule, eps)
    return get_remasking("low_confidence" if remasking is None else remasking), sched, threshold


def one_block(lm: LoadedModel, gen_length: int) -> int | None:
    """The whole generation as one block (LLaDA-style), or None for a block-diffusion model: its own blocks."""
    return None if lm.block_size else gen_length


def get_schedule(schedule: str | Schedule, eps: float = 1e-3) -> Schedule:
    if isinstance(schedule, Schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise DLMScopeError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    return DreamSchedule(eps) if schedule == "dream" else SCHEDULES[schedule]()


def transfer_schedule(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) tokens to unmask per step under LLaDA's linear schedule."""
    return LinearSchedule().plan(n_masked, steps)


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """argmax of exp(logits) / (-log u)^temperature in float64 (LLaDA's Gumbel-max sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    return (logits.exp() / (-torch.log(u)) ** temperature).argmax(-1)


@dataclass(frozen=True)
class TokenSampling:
    """How the predicted tokens x0 are drawn: temperature, then Dream's top-p and top-k filters.

    Without filters x0 is LLaDA's float64 Gumbel-max draw; with them, a Gumbel-max draw from Dream's
    filtered distribution (the same distribution as Dream's categorical draw, other random numbers).
    """

    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None

    @property
    def filtered(self) -> bool:
        return (self.top_p is not None and self.top_p < 1) or bool(self.top_k)

    def distribution_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Dream's `sample_tokens` logits: / temperature (if > 0), top-p, then top-k; removed entries at finfo.min."""
        z = logits.float()
        if self.temperature > 0:
            z = z / self.temperature
        floor = torch.finfo(z.dtype).min
        if self.top_p is not None and self.top_p < 1:
            sorted_z, order = torch.sort(z, dim=-1, descending=True)
            cum = torch.cumsum(F.softmax(sorted_z, dim=-1), dim=-1)
            drop = torch.zeros_like(cum, dtype=torch.bool)
            drop[..., 1:] = cum[..., :-1] > self.top_p  # keep the token that crosses top_p
            z = z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), floor)
        if self.top_k:
            kth = torch.topk(z, min(self.top_k, z.shape[-1]), dim=-1).values[..., -1:]
            z = z.masked_fill(z < kth, floor)
        return z

    def draw(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not self.filtered:
            return gumbel_argmax(logits, self.temperature, generator)
        z = self.distribution_logits(logits)
        if self.temperature == 0:
            return z.argmax(-1)
        u = torch.rand(z.shape, generator=generator, dtype=torch.float64).to(z.device)
        return (z.double() - torch.log(-torch.log(u))).argmax(-1)


@dataclass
class DenoiseStep:
    """Everything about one denoising step, handed to callbacks and kept in the history."""

    step: int  # global step index, 0-based
    n_steps: int
    block: int
    t: float  # fraction of generated positions still masked before this step
    x: torch.Tensor  # (B, L) sequence before the step
    mask: torch.Tensor  # (B, L) bool, masked before the step
    logits: torch.Tensor | None  # (B, L, V) aligned logits (None in the history unless kept)
    x0: torch.Tensor  # (B, L) predicted tokens
    confidence: torch.Tensor  # (B, L) strategy scores, -inf where not a candidate
    transfer: torch.Tensor  # (B, L) bool, positions unmasked at this step


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


@dataclass
class GenerateOutput:
    """Sampler result: full sequences (left-padded prompt + generation) and the optional history."""

    sequences: torch.Tensor  # (B, P + G)
    attention_mask: torch.Tensor  # (B, P + G)
    prompt_length: int
    texts: list[str] | None
    history: list[DenoiseStep] = field(default_factory=list)
    n_forwards: int = 0  # model calls (a KV-cached step counts as one, though it computes only its window)

    @property
    def generated(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (B, P) ids and a 1/0 attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        if len(p):
            ids[b, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[b, width - len(p):] = 1
    return ids, mask


def _prepare_prompts(lm: LoadedModel, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        return prompts.long(), torch.ones_like(prompts, dtype=torch.long)
    prompts = list(prompts)
    if not prompts:
        raise DLMScopeError("the prompt list is empty; give at least one prompt")
    if all(isinstance(p, str) for p in prompts):
        prompts = lm.to_tokens(prompts)
    pad = lm.pad_id  # `models.ids`: the tokenizer's, config.json's, else EOS (never the mask id if avoidable)
    if pad is None:
        pad = getattr(lm.tokenizer, "pad_token_id", None) if lm.tokenizer is not None else None
    return left_pad(prompts, pad if pad is not None else lm.require_mask_id())


def _check_options(temperature: float, cfg_scale: float, top_p: float | None, top_k: int | None,
                   alg_temp: float | None, eps: float) -> None:
    """One-line errors for sampling options outside what upstream accepts (nan and inf included)."""
    checks.number("temperature", temperature, 0)
    checks.number("cfg_scale", cfg_scale, 0)
    if top_p is not None:
        checks.number("top_p", top_p, 0, 1, low_open=True)
    if top_k is not None:
        checks.integer("top_k", top_k, 0)  # 0 = off
    if alg_temp is not None:
        checks.number("alg_temp", alg_temp, 0)  # 0 = take the top scores
    checks.number("eps", eps, 0, 1, high_open=True)


def context_limit(lm: LoadedModel) -> int | None:
    """Longest sequence the checkpoint was built for (max_position_embeddings), if it says."""
    if lm.context_length is not None:
        return lm.context_length
    config = getattr(lm.module, "config", None)
    for name in ("max_position_embeddings", "max_sequence_length", "n_positions"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def block_bounds(P: int, gen_length: int, block_length: int, aligned: bool) -> list[tuple[int, int]]:
    """[lo, hi) of each block of the generation after a prompt of width P.

    `aligned` (block-diffusion models): blocks are the model's own, multiples of `block_length` from
    position 0; the first is the one the prompt ends in (its free part) and the last is filled
    completely, so the generation may be longer than `gen_length` (as LLaDA 2.x's sampler does).
    """
    if not aligned:
        return [(P + b * block_length, P + (b + 1) * block_length) for b in range(gen_length // block_length)]
    first, end = P // block_length, -(-(P + gen_length) // block_length)
    return [(max(P, b * block_length), (b + 1) * block_length) for b in range(first, end)]


class StepForward:
    """The model call of one denoising step: a full forward, or Fast-dLLM's block-wise KV cache.

    With a cache, the first step of each block is a full forward that refreshes the cache; the
    other steps compute only the cache's window (`prefix`: the block and everything after it;
    `dual`: the block; Dream-style shifted models one position more on the left), and the logits
    of the other positions are those of the last forward that computed them. Not recomputed on a
    cached step: the positions before the block (`prefix`, `dual`) and after it (`dual`).
    Hooks still run on every step, on the window only; `lm.state.window` = (start, end) says which
    positions the activations cover, and position selectors (given over the whole sequence) are
    cut to it, so `capture(positions="masked")` sees every masked position under `prefix` (they all
    lie in the window) and only the current block's under `dual`.
    """

    def __init__(self, lm: LoadedModel, cache: str | None):
        self.lm = lm
        self.cache = BlockKVCache(lm, cache) if cache is not None else None
        self.last: torch.Tensor | None = None
        self.count = 0

    def __call__(self, ids: torch.Tensor, attn: torch.Tensor, state: ForwardState, lo: int, hi: int,
                 first_in_block: bool, clean: torch.Tensor | None = None) -> torch.Tensor:
        """Denoising logits of `ids`; `clean` (teacher forcing) lets a block-diffusion model read each block
        given the clean earlier blocks (`LoadedModel.denoise_logits`)."""
        self.count += 1
        if self.cache is None:
            self.lm.state = state
            return self.lm.denoise_logits(ids, attn, clean=clean)
        if first_in_block:
            self.lm.state = state
            self.last = self.cache.refresh(ids, attn, lo, hi)
            return self.last
        state.window = self.cache.window
        self.lm.state = state
        fresh = self.cache.step(ids)
        logits = self.last.clone()
        logits[:, lo:lo + fresh.shape[1]] = fresh
        self.last = logits
        return logits


def check_fast_options(lm: LoadedModel, threshold: float | None, cache: str | None,
                       strategy: Remasking | None = None) -> None:
    """One-line errors for Fast-dLLM's options, before any work."""
    if lm.causal and (threshold is not None or cache is not None):
        raise DLMScopeError(f"threshold / cache are diffusion sampler options; {lm.name} is autoregressive")
    check_threshold(threshold, strategy)
    check_cache(lm, cache)


def check_threshold(threshold: float | None, strategy: Remasking | None = None) -> None:
    if threshold is None:
        return
    checks.number("threshold", threshold, 0, 1, low_open=True)
    if strategy is not None and not strategy.ranks:
        raise DLMScopeError(f"threshold decoding needs a strategy that scores positions; {strategy.name!r} picks "
                            "them at random by itself")


@torch.no_grad()
def generate(
    lm: LoadedModel,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    gen_length: int = 128,
    steps: int = 128,
    block_length: int | None = None,
    temperature: float = 0.0,
    remasking: str | Remasking | None = None,
    cfg_scale: float = 0.0,
    *,
    schedule: str | Schedule | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    alg_temp: float | None = None,
    eps: float = 1e-3,
    callback: Callable[[DenoiseStep], None] | None = None,
    return_history: bool = False,
    keep_logits: bool = False,
    seed: int | None = None,
    threshold: float | None = None,
    cache: str | None = None,
    eos_early_stop: bool = False,
) -> GenerateOutput:
    """Generate `gen_length` tokens after each prompt by iterative unmasking.

    `remasking` and `schedule` None are the checkpoint family's own (`family_sampler`): `linear` with
    `low_confidence` reproduces upstream LLaDA `generate`, `dream` (with `eps`) Dream's `diffusion_generate`,
    and a block-diffusion model (LLaDA 2.x) runs its own block sampler (`diffusion.blocks`; `threshold` is
    then that sampler's, 0.95 by default, `block_length` the model's block length for this run, default
    its `block_size`, and `steps` the total over the prompt's last block and the blocks after it).
    Otherwise `block_length` None fits the generation (the schedule's `default_block_length`: one block
    for `dream`, else 32 when it divides `gen_length`). Steps are split evenly over blocks; each step
    reveals the schedule's count of the positions `remasking` scores best (drawn from
    softmax(score / alg_temp) when `alg_temp` > 0), never remasking. `top_p` / `top_k` filter the token
    distribution as Dream does.

    Fast decoding (Fast-dLLM, arXiv 2505.22618): `threshold` reveals, in the current block, every
    masked position whose confidence (the strategy's score) is >= threshold, at least the best one
    per step, until the block is full (`steps` then sets only the block count check; a run takes
    1 to `block_length` steps per block, and `lm.state.n_steps` is `gen_length`, the most it can take). `cache` "prefix" / "dual" reuses keys/values of the
    positions before (and, dual, after) the block within a block (see `StepForward`).
    `eos_early_stop` ends the run after the first block that leaves every row's generation free of masks
    and holding `lm.eos_id` (upstream LLaDA 2.x's early stop); later positions stay masked.
    """
    if lm.causal:
        raise DLMScopeError(f"{lm.name} is autoregressive; the diffusion sampler needs a masked diffusion model")
    mask_id = lm.require_mask_id()
    _check_options(temperature, cfg_scale, top_p, top_k, alg_temp, eps)
    if gen_length < 1:
        raise DLMScopeError(f"gen_length={gen_length} must be >= 1")
    if lm.block_size:  # a block-diffusion model's blocks are its own, aligned to absolute positions
        block_length = lm.block_size if block_length is None else checks.integer("block_length", block_length, 1)
    strategy, sched, threshold = family_sampler(lm, remasking, schedule, eps, threshold, block_length)
    if eos_early_stop and lm.eos_id is None:
        raise DLMScopeError(f"eos_early_stop needs an EOS id; {lm.name} declares none (pass load_model(..., eos_id=N))")
    block_length = sched.default_block_length(gen_length) if block_length is None else block_length
    if block_length < 1 or (gen_length % block_length and not lm.block_size):
        raise DLMScopeError(f"gen_length={gen_length} is not divisible by block_length={block_length}")
    n_blocks = gen_length // block_length
    if not lm.block_size and (not 1 <= steps <= gen_length or steps % n_blocks):
        raise DLMScopeError(
            f"steps={steps} out of range: need 1 <= steps <= gen_length ({gen_length}) and a multiple of the "
            f"number of blocks ({n_blocks})"
        )
    sampling = TokenSampling(temperature, top_p, top_k)
    check_fast_options(lm, threshold, cache, strategy)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    prompt_ids, prompt_mask = _prepare_prompts(lm, prompts)
    B, P = prompt_ids.shape
    bounds = block_bounds(P, gen_length, block_length, aligned=bool(lm.block_size))
    gen_length = bounds[-1][1] - P
    if lm.block_size and (steps < 1 or steps % len(bounds)):
        raise DLMScopeError(f"steps={steps} must be a positive multiple of the number of blocks ({len(bounds)}: the "
                            f"prompt's last block and the {block_length}-token blocks after it)")
    steps_per_block = steps // len(bounds)
    limit = context_limit(lm)
    if limit is not None and P + gen_length > limit:
        raise DLMScopeError(f"prompt ({P} tokens) + gen_length ({gen_length}) = {P + gen_length} tokens exceeds "
                            f"{lm.name}'s context of {limit}; shorten the prompt or gen_length")
    device = lm.device
    x = torch.cat([prompt_ids, torch.full((B, gen_length), mask_id, dtype=torch.long)], 1).to(device)
    attn = torch.cat([prompt_mask, torch.ones((B, gen_length), dtype=torch.long)], 1).to(device)
    is_prompt = torch.zeros_like(x, dtype=torch.bool)
    is_prompt[:, :P] = True
    history: list[DenoiseStep] = []
    forward = StepForward(lm, cache)
    n_steps = gen_length if threshold is not None else steps  # with a threshold, the most a run can take
    step = 0
    model_blocks = lm.block_size
    if model_blocks:
        lm.block_size = block_length  # this run's block length: the attention mask and the cache read it
    strategy.begin(lm, x)
    try:
        for block, (lo, hi) in enumerate(bounds):
            i = 0
            while ((x[:, lo:hi] == mask_id).any() if threshold is not None else i < steps_per_block
                   and (not lm.block_size or (x[:, lo:hi] == mask_id).any())):  # block models: stop when full
                mask = x == mask_id
                t = float(mask[:, P:].float().mean())
                if cfg_scale > 0:
                    uncond = x.masked_fill(is_prompt & attn.bool(), mask_id)
                    both = torch.cat([x, uncond])
                    state = ForwardState(step, n_steps, block, both == mask_id, t)
                    cond, un = forward(both, torch.cat([attn, attn]), state, lo, hi, i == 0).chunk(2)
                    logits = un + (cfg_scale + 1) * (cond - un)
                else:
                    logits = forward(x, attn, ForwardState(step, n_steps, block, mask, t), lo, hi, i == 0)
                x0 = sampling.draw(logits, generator)
                x0 = torch.where(mask, x0, x)
                candidates = mask.clone()
                candidates[:, :lo] = False
                candidates[:, hi:] = False
                s = StepInput(lm, x, logits, x0, candidates, step, n_steps, i, steps_per_block, generator,
                              sampling, sched, alg_temp)
                if threshold is None:
                    confidence, transfer = strategy.select(s, sched.counts(candidates.sum(1), i, steps_per_block))
                else:
                    confidence, transfer = strategy.select_above(s, threshold)
                record = DenoiseStep(step, n_steps, block, t, x, mask, logits if (keep_logits or callback) else None,
                                     x0, confidence, transfer)
                x = torch.where(transfer, x0, x)
                if callback is not None:
                    callback(record)
                if return_history:
                    if not keep_logits:
                        record.logits = None
                    history.append(record)
                i += 1
                step += 1
            if eos_early_stop and bool(((x[:, P:hi] == lm.eos_id).any(1) & (x[:, P:hi] != mask_id).all(1)).all()):
                break
    finally:
        strategy.end()
        lm.state = ForwardState()
        if model_blocks:
            lm.block_size = model_blocks
    texts = None
    if lm.tokenizer is not None:
        eos = lm.eos_id if lm.eos_id is not None else lm.tokenizer.eos_token_id
        rows = [row.tolist() for row in x[:, P:].cpu()]
        texts = [lm.to_text(r[: r.index(eos)] if eos in r else r) for r in rows]
    return GenerateOutput(x.cpu(), attn.cpu(), P, texts, history, forward.count)
