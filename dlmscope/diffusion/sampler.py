"""The denoising sampler: LLaDA's semi-autoregressive block schedule with pluggable remasking strategies.

The loop owns the schedule (how many positions to unmask per step, block by block, never
remasking); a `Remasking` strategy only scores candidate positions (or, for Dream's `origin`,
picks them itself). Everything that happens "during diffusion" (activation capture, steering,
SAE-informed ordering) is a hook or a strategy plugged into this loop, which also keeps
`lm.state` current so hooks know the step and the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import DLMScopeError
from ..models.base import ForwardState, LoadedModel


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


class Remasking:
    """Scores masked positions; the loop unmasks the `n` best of each row. Subclass to add a strategy."""

    name = "base"

    def begin(self, lm: LoadedModel, x: torch.Tensor) -> None:
        """Called once before the first step (set up hooks, state)."""

    def end(self) -> None:
        """Called once after the last step, also on error."""

    def scores(self, s: StepInput) -> torch.Tensor:
        raise NotImplementedError

    def select(self, s: StepInput, n_transfer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (scores, transfer mask) with exactly `n_transfer[b]` candidates picked in row b."""
        score = self.scores(s).to(torch.float64).masked_fill(~s.candidates, float("-inf"))
        return score, top_n_mask(score, n_transfer)


def top_n_mask(score: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(B, L) bool with the n[b] highest scores of row b set."""
    transfer = torch.zeros_like(score, dtype=torch.bool)
    k_max = int(n.max())
    if k_max > 0:
        idx = torch.topk(score, k_max, dim=1).indices
        keep = torch.arange(k_max, device=score.device)[None] < n.to(score.device)[:, None]
        transfer.scatter_(1, idx, keep)
    return transfer


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.to(torch.float64), dim=-1)


class LowConfidence(Remasking):
    """Unmask the most confident predictions first (LLaDA `low_confidence`, Dream `maskgit_plus`)."""

    name = "low_confidence"

    def scores(self, s: StepInput) -> torch.Tensor:
        # softmax(logits)[x0] without materialising the distribution
        logits = s.logits.float()
        return torch.exp(torch.gather(logits, -1, s.x0[..., None]).squeeze(-1) - torch.logsumexp(logits, -1))


class RandomOrder(Remasking):
    """Unmask uniformly random positions (LLaDA `random`)."""

    name = "random"

    def scores(self, s: StepInput) -> torch.Tensor:
        return torch.rand(s.x.shape, generator=s.generator, dtype=torch.float64).to(s.x.device)


class TopKMargin(Remasking):
    """Largest gap between the top two probabilities first (Dream `topk_margin`)."""

    name = "topk_margin"

    def scores(self, s: StepInput) -> torch.Tensor:
        top2 = torch.topk(_probs(s.logits), 2, dim=-1).values
        return top2[..., 0] - top2[..., 1]


class Entropy(Remasking):
    """Lowest predictive entropy first (Dream `entropy`)."""

    name = "entropy"

    def scores(self, s: StepInput) -> torch.Tensor:
        p = _probs(s.logits)
        return (p * torch.log(p.clamp_min(1e-300))).sum(-1)


class Origin(Remasking):
    """Dream's `origin`: each masked position is revealed with probability 1 - s/t, in random order.

    Timesteps run linspace(1, eps, steps + 1) within each block; the block's last step reveals the rest.
    """

    name = "origin"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def scores(self, s: StepInput) -> torch.Tensor:
        return torch.rand(s.x.shape, generator=s.generator, dtype=torch.float64).to(s.x.device)

    def select(self, s: StepInput, n_transfer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = self.scores(s).masked_fill(~s.candidates, float("-inf"))
        ts = torch.linspace(1.0, self.eps, s.steps_per_block + 1, dtype=torch.float64)
        t, t_next = ts[s.step_in_block], ts[s.step_in_block + 1]
        if s.step_in_block == s.steps_per_block - 1:
            return score, s.candidates.clone()
        u = torch.rand(s.x.shape, generator=s.generator, dtype=torch.float64).to(s.x.device)
        return score, s.candidates & (u < 1.0 - t_next / t)


REMASKING: dict[str, Callable[[], Remasking]] = {
    "low_confidence": LowConfidence, "maskgit_plus": LowConfidence, "random": RandomOrder,
    "topk_margin": TopKMargin, "entropy": Entropy, "origin": Origin,
}


def get_remasking(strategy: str | Remasking) -> Remasking:
    if isinstance(strategy, Remasking):
        return strategy
    if strategy not in REMASKING:
        raise DLMScopeError(f"unknown remasking strategy {strategy!r}; allowed: {', '.join(REMASKING)}")
    return REMASKING[strategy]()


def transfer_schedule(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) tokens to unmask per step: n // steps each, the remainder to the first steps."""
    base = n_masked // steps
    rem = n_masked % steps
    sched = base[:, None].expand(-1, steps).clone()
    sched += torch.arange(steps, device=n_masked.device)[None] < rem[:, None]
    return sched


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """argmax of exp(logits) / (-log u)^temperature in float64 (LLaDA's Gumbel-max sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    return (logits.exp() / (-torch.log(u)) ** temperature).argmax(-1)


@dataclass
class GenerateOutput:
    """Sampler result: full sequences (left-padded prompt + generation) and the optional history."""

    sequences: torch.Tensor  # (B, P + G)
    attention_mask: torch.Tensor  # (B, P + G)
    prompt_length: int
    texts: list[str] | None
    history: list[DenoiseStep] = field(default_factory=list)

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
    pad = getattr(lm.tokenizer, "pad_token_id", None) if lm.tokenizer is not None else None
    if pad is None:  # no tokenizer: the checkpoint's own pad id, as upstream LLaDA pads (never the mask id if avoidable)
        pad = getattr(getattr(lm.module, "config", None), "pad_token_id", None)
    return left_pad(prompts, pad if pad is not None else lm.require_mask_id())


@torch.no_grad()
def generate(
    lm: LoadedModel,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    gen_length: int = 128,
    steps: int = 128,
    block_length: int | None = None,
    temperature: float = 0.0,
    remasking: str | Remasking = "low_confidence",
    cfg_scale: float = 0.0,
    *,
    callback: Callable[[DenoiseStep], None] | None = None,
    return_history: bool = False,
    keep_logits: bool = False,
    seed: int | None = None,
) -> GenerateOutput:
    """Generate `gen_length` tokens after each prompt by iterative unmasking.

    `block_length` None fits the generation: 32 when it divides `gen_length`, else one block. Steps are
    split evenly over blocks; each step unmasks the per-block linear schedule's count of positions chosen
    by `remasking` (never remasking).
    With temperature 0 and `low_confidence` this reproduces upstream LLaDA `generate`.
    """
    if lm.causal:
        raise DLMScopeError(f"{lm.name} is autoregressive; the diffusion sampler needs a masked diffusion model")
    mask_id = lm.require_mask_id()
    if block_length is None:
        block_length = 32 if gen_length % 32 == 0 else gen_length
    if gen_length < 1:
        raise DLMScopeError(f"gen_length={gen_length} must be >= 1")
    if block_length < 1 or gen_length % block_length:
        raise DLMScopeError(f"gen_length={gen_length} is not divisible by block_length={block_length}")
    n_blocks = gen_length // block_length
    if not 1 <= steps <= gen_length or steps % n_blocks:
        raise DLMScopeError(
            f"steps={steps} out of range: need 1 <= steps <= gen_length ({gen_length}) and a multiple of the "
            f"number of blocks ({n_blocks})"
        )
    if not (temperature >= 0 and temperature == temperature):
        raise DLMScopeError(f"temperature={temperature} must be >= 0")
    strategy = get_remasking(remasking)
    steps_per_block = steps // n_blocks
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    prompt_ids, prompt_mask = _prepare_prompts(lm, prompts)
    B, P = prompt_ids.shape
    device = lm.device
    x = torch.cat([prompt_ids, torch.full((B, gen_length), mask_id, dtype=torch.long)], 1).to(device)
    attn = torch.cat([prompt_mask, torch.ones((B, gen_length), dtype=torch.long)], 1).to(device)
    is_prompt = torch.zeros_like(x, dtype=torch.bool)
    is_prompt[:, :P] = True
    history: list[DenoiseStep] = []
    strategy.begin(lm, x)
    try:
        for block in range(n_blocks):
            lo, hi = P + block * block_length, P + (block + 1) * block_length
            n_transfer = transfer_schedule((x[:, lo:hi] == mask_id).sum(1), steps_per_block)
            for i in range(steps_per_block):
                step = block * steps_per_block + i
                mask = x == mask_id
                t = float(mask[:, P:].float().mean())
                if cfg_scale > 0:
                    uncond = x.masked_fill(is_prompt & attn.bool(), mask_id)
                    both = torch.cat([x, uncond])
                    lm.state = ForwardState(step, steps, block, both == mask_id, t)
                    cond, un = lm.denoise_logits(both, torch.cat([attn, attn])).chunk(2)
                    logits = un + (cfg_scale + 1) * (cond - un)
                else:
                    lm.state = ForwardState(step, steps, block, mask, t)
                    logits = lm.denoise_logits(x, attn)
                x0 = gumbel_argmax(logits, temperature, generator)
                x0 = torch.where(mask, x0, x)
                candidates = mask.clone()
                candidates[:, :lo] = False
                candidates[:, hi:] = False
                s = StepInput(lm, x, logits, x0, candidates, step, steps, i, steps_per_block, generator)
                confidence, transfer = strategy.select(s, n_transfer[:, i])
                record = DenoiseStep(step, steps, block, t, x, mask, logits if (keep_logits or callback) else None,
                                     x0, confidence, transfer)
                x = torch.where(transfer, x0, x)
                if callback is not None:
                    callback(record)
                if return_history:
                    if not keep_logits:
                        record.logits = None
                    history.append(record)
    finally:
        strategy.end()
        lm.state = ForwardState()
    texts = None
    if lm.tokenizer is not None:
        eos = lm.tokenizer.eos_token_id
        rows = [row.tolist() for row in x[:, P:].cpu()]
        texts = [lm.to_text(r[: r.index(eos)] if eos in r else r) for r in rows]
    return GenerateOutput(x.cpu(), attn.cpu(), P, texts, history)
