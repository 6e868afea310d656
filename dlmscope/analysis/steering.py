"""Feature steering during generation, for diffusion samplers and autoregressive decoding alike.

SAE mode (DLM-Scope): A = encode(h); A[f] += strength * max(A) (or + strength when `scale` is
"fixed"); h' = decode(A) + (h - decode(encode(h))), so the reconstruction error is kept and
strength 0 is exactly the identity. Decoding is affine in A, so this equals
h + bump * W_dec[f] / scale, which is how it is computed (one top-k encode, no dense decode). Direction mode adds strength * W_dec[f] to h.
Schedules pick denoising steps (all, the first fraction, a list) and positions (all, still
masked, generated, or the top-n positions by the feature's activation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import DLMScopeError
from ..hooks import hooked, run_with_cache
from ..models.base import LoadedModel
from .splice import check_sae_matches

STEER_POSITIONS = ("all", "masked", "generated")


@dataclass
class SteeringSpec:
    """One feature to push, how hard, when and where."""

    feature: int
    strength: float = 2.0
    mode: str = "sae"
    """sae (edit the latent, keep the error) or direction (add strength * W_dec[f])."""
    scale: str = "max"
    """max: add strength * max(A) per position (DLM-Scope); fixed: add strength."""
    steps: str | Sequence[int] = "all"
    """all, first:FRACTION (e.g. first:0.1), or a list of step indices."""
    positions: str = "all"
    """all, masked, generated, or top:N."""


def _step_ok(spec: SteeringSpec, step: int | None, n_steps: int | None) -> bool:
    if spec.steps == "all":
        return True
    if step is None:
        return False
    if isinstance(spec.steps, str):
        frac = float(spec.steps.split(":", 1)[1])
        return step < max(1, math.ceil(frac * (n_steps or 1)))
    return step in set(spec.steps)


def validate(spec: SteeringSpec, sae) -> None:
    if not 0 <= spec.feature < sae.cfg.n_latents:
        raise DLMScopeError(f"feature {spec.feature} out of range: the SAE has latents 0..{sae.cfg.n_latents - 1}")
    if not math.isfinite(spec.strength):
        raise DLMScopeError(f"strength {spec.strength} is not finite")
    if spec.mode not in ("sae", "direction") or spec.scale not in ("max", "fixed"):
        raise DLMScopeError(f"mode={spec.mode!r} / scale={spec.scale!r}; allowed: sae|direction and max|fixed")
    pos = spec.positions
    if not (pos in STEER_POSITIONS or (pos.startswith("top:") and pos[4:].isdigit())):
        raise DLMScopeError(f"positions={pos!r}; allowed: {', '.join(STEER_POSITIONS)}, top:N")
    if isinstance(spec.steps, str) and spec.steps != "all":
        try:
            frac = float(spec.steps.split(":", 1)[1]) if spec.steps.startswith("first:") else -1
        except ValueError:
            frac = -1
        if not 0 < frac <= 1:
            raise DLMScopeError(f"steps={spec.steps!r}; allowed: all, first:FRACTION in (0, 1], or a list of steps")


@contextmanager
def steer(lm: LoadedModel, sae, spec: SteeringSpec, prompt_length: int = 0):
    """Apply `spec` to every forward inside the block (the sampler's or an AR loop's)."""
    hook = check_sae_matches(lm, sae)
    validate(spec, sae)
    f = spec.feature

    def fn(act: torch.Tensor, ctx) -> torch.Tensor | None:
        if spec.strength == 0 or not _step_ok(spec, ctx.state.step, ctx.state.n_steps):
            return None
        h = act.float()
        if spec.mode == "direction":
            new = h + spec.strength * sae.W_dec[f].to(h) / sae.input_scale
        else:
            bump = spec.strength * (sae.encode_topk(h)[0].max(-1).values if spec.scale == "max"
                                    else torch.ones_like(h[..., 0]))
            new = h + bump[..., None] * sae.W_dec[f].to(h) / sae.input_scale
        B, L = h.shape[:2]
        if spec.positions == "masked" and ctx.state.mask is not None:
            where = ctx.state.mask.to(h.device)
        elif spec.positions == "generated":
            where = torch.arange(L, device=h.device)[None].expand(B, L) >= prompt_length
        elif spec.positions.startswith("top:"):
            n = min(int(spec.positions[4:]), L)
            score = sae.encode(h)[..., f]
            where = torch.zeros(B, L, dtype=torch.bool, device=h.device)
            where.scatter_(1, score.topk(n, dim=1).indices, True)
        else:
            return new.to(act.dtype)
        return torch.where(where[..., None], new, h).to(act.dtype)

    with hooked(lm, {hook: fn}):
        yield


@torch.no_grad()
def ar_generate(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy decoding for autoregressive models; each token is one 'step' for steering schedules."""
    from ..models.base import ForwardState

    if not prompts:
        raise DLMScopeError("the prompt list is empty; give at least one prompt")
    texts = []
    for ids in lm.to_tokens(list(prompts)):
        x = torch.tensor([ids], device=lm.device)
        for step in range(max_new_tokens):
            lm.state = ForwardState(step=step, n_steps=max_new_tokens)
            x = torch.cat([x, lm.forward(x)[:, -1:].argmax(-1)], 1)
        lm.state = ForwardState()
        new = x[0, len(ids):].tolist()
        eos = lm.tokenizer.eos_token_id
        texts.append(lm.to_text(new[: new.index(eos)] if eos in new else new))
    return texts


def steered_generate(lm: LoadedModel, sae, spec: SteeringSpec | None, prompts: Sequence[str], gen_length: int = 32,
                     steps: int = 32, seed: int = 0, temperature: float = 0.0) -> list[str]:
    """Generate with (or, spec None, without) steering; the sampler for DLMs, greedy decoding for AR."""
    from contextlib import nullcontext

    from ..diffusion.sampler import generate

    prompt_len = max(len(p) for p in lm.to_tokens(list(prompts))) if prompts else 0
    ctx = steer(lm, sae, spec, prompt_len) if spec is not None else nullcontext()
    with ctx:
        if lm.causal:
            return ar_generate(lm, prompts, gen_length)
        return generate(lm, list(prompts), gen_length=gen_length, steps=steps, block_length=gen_length,
                        temperature=temperature, seed=seed).texts


@torch.no_grad()
def feature_token_profile(lm: LoadedModel, sae, feature: int, rows: torch.Tensor, top: int = 20) -> list[int]:
    """Token ids on which the feature fires most on average (clean held-out text): its 'concept'."""
    hook = check_sae_matches(lm, sae)
    acts = run_with_cache(lm, rows.to(lm.device), [hook])[hook].float()
    a = sae.encode(acts)[..., feature].flatten().cpu()
    tok = rows.flatten()
    sums = torch.zeros(lm.vocab_size).index_add_(0, tok, a)
    counts = torch.zeros(lm.vocab_size).index_add_(0, tok, torch.ones_like(a))
    mean = sums / counts.clamp_min(1)
    mean[counts < 2] = 0
    return mean.topk(top).indices.tolist()


@torch.no_grad()
def steering_metrics(lm: LoadedModel, sae, feature: int, texts: Sequence[str], concept: Sequence[int],
                     ar_judge: LoadedModel | None = None) -> dict:
    """Feature activation when re-encoded, concept-token rate, and AR-twin perplexity of the texts."""
    hook = check_sae_matches(lm, sae)
    acts, hits, n_tok, nll, nll_tok = [], 0, 0, 0.0, 0
    concept_set = set(concept)
    for text in texts:
        ids = lm.to_tokens(text)[0]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], device=lm.device)
        h = run_with_cache(lm, x, [hook])[hook].float()
        acts.append(float(sae.encode(h)[0, 1:, feature].mean()))
        hits += sum(t in concept_set for t in ids[1:])
        n_tok += len(ids) - 1
        if ar_judge is not None:
            from ..diffusion.loss import next_token_ce

            y = torch.tensor([ar_judge.to_tokens(text)[0]], device=ar_judge.device)
            ce = next_token_ce(ar_judge.forward(y), y)
            nll += float(ce.sum())
            nll_tok += ce.numel()
    return {"feature_activation": sum(acts) / max(1, len(acts)), "concept_rate": hits / max(1, n_tok),
            "perplexity": math.exp(nll / nll_tok) if nll_tok else float("nan"), "n_texts": len(texts)}
