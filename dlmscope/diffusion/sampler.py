"""The denoising sampler: a block loop with a pluggable schedule and pluggable remasking strategies.

Three small objects split the work of one step, so each can be swapped on its own:
- a `Schedule` says how many of a block's masked positions a step reveals (`linear`: LLaDA's
  even split, remainder first; `dream`: Dream's `int(n * (1 - s/t))` on `linspace(1, eps, steps + 1)`);
- a `TokenSampling` draws the predicted tokens x0 (temperature, Dream's top-p / top-k);
- a `Remasking` strategy scores the candidates (or, for Dream's `origin`, picks them itself); the
  best `n` are revealed, or with `alg_temp` drawn from a softmax over the scores, never remasked.
The parts live in sibling modules (`schedules`, `sampling`, `remasking`, `stepforward`: the model call,
with Fast-dLLM's KV cache; `prompts`: prompt batching) and are re-exported here, so
`from dlmscope.diffusion.sampler import ...` keeps working for every name it ever offered.
Everything that happens "during diffusion" (activation capture, steering, SAE-informed ordering)
is a hook or a strategy plugged into this loop, which also keeps `lm.state` current so hooks know
the step and the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import checks
from ..errors import DLMScopeError
from ..models.base import ForwardState, LoadedModel
from .prompts import left_pad, prepare_prompts
from .remasking import (REMASKING, DreamConfidence, Entropy, LowConfidence, MaskgitPlus, Origin, RandomOrder,
                        Remasking, StepInput, TopKMargin, check_threshold, get_remasking, sample_n_mask, top_n_mask)
from .sampling import TokenSampling, gumbel_argmax
from .schedules import (SCHEDULES, DreamSchedule, LinearSchedule, Schedule, default_schedule, get_schedule,
                        transfer_schedule)
from .stepforward import StepForward, check_fast_options

__all__ = [  # the sampler's public surface, wherever each part lives
    "family_sampler", "one_block", "DenoiseStep", "GenerateOutput", "context_limit", "block_bounds", "generate",
    "DreamConfidence", "DreamSchedule", "Entropy", "LinearSchedule", "LowConfidence", "MaskgitPlus", "Origin",
    "REMASKING", "RandomOrder", "Remasking", "SCHEDULES", "Schedule", "StepForward", "StepInput", "TokenSampling",
    "TopKMargin", "check_fast_options", "check_threshold", "default_schedule", "get_remasking", "get_schedule",
    "gumbel_argmax", "left_pad", "sample_n_mask", "top_n_mask", "transfer_schedule", "prepare_prompts",
]


def family_sampler(lm: LoadedModel, remasking: str | Remasking | None, schedule: str | Schedule | None, eps: float,
                   threshold: float | None, block_length: int | None) -> tuple[Remasking, Schedule, float | None]:
    """(strategy, schedule, Fast-dLLM threshold): what the caller names, else the checkpoint family's own.

    LLaDA and LLaDA-MoE: `linear` + `low_confidence`; Dream: `dream` + `low_confidence`; LLaDA 2.x: its block
    sampler (`diffusion.blocks`: a per-block quota, and `threshold` is its own, 0.95 by default).
    """
    if lm.block_size:
        from .blocks import BlockQuota, ThresholdQuota  # blocks builds on this module

        sched = BlockQuota(block_length or lm.block_size) if schedule is None else get_schedule(schedule, eps)
        if remasking is None:
            level = 0.95 if threshold is None else checks.number("threshold", threshold, 0, 1)
            return ThresholdQuota(level), sched, None
        return get_remasking(remasking), sched, threshold
    sched = get_schedule(default_schedule(lm) if schedule is None else schedule, eps)
    return get_remasking("low_confidence" if remasking is None else remasking), sched, threshold


def one_block(lm: LoadedModel, gen_length: int) -> int | None:
    """The whole generation as one block (LLaDA-style), or None for a block-diffusion model: its own blocks."""
    return None if lm.block_size else gen_length


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


def check_generate_options(gen_length: int, steps: int, block_length: int | None = None, seed: int | None = None,
                           threshold: float | None = None, *, temperature: float = 0.0, cfg_scale: float = 0.0,
                           top_p: float | None = None, top_k: int | None = None, alg_temp: float | None = None,
                           eps: float = 1e-3) -> None:
    """The model-independent options of `generate`, checked before any model loads (`generate` re-checks what
    depends on the model: divisibility, the context, the strategy)."""
    checks.positive("gen_length", gen_length)
    checks.positive("steps", steps)
    if block_length is not None:
        checks.positive("block_length", block_length)
    if seed is not None:
        checks.seed("seed", seed)
    check_threshold(threshold)
    _check_options(temperature, cfg_scale, top_p, top_k, alg_temp, eps)


def check_context_length(lm: LoadedModel, length: int, name: str = "context_length") -> int:
    """A sequence length the checkpoint was built for (past its positions the model is out of distribution)."""
    limit = context_limit(lm)
    if limit is not None and length > limit:
        raise DLMScopeError(f"{name}={length} exceeds {lm.name}'s context of {limit} tokens")
    return length


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

    prompt_ids, prompt_mask = prepare_prompts(lm, prompts)
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
            if eos_early_stop and lm.eos_id is not None and bool(
                    ((x[:, P:hi] == lm.eos_id).any(1) & (x[:, P:hi] != mask_id).all(1)).all()):
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
