"""Feature steering during generation, for diffusion samplers and autoregressive decoding alike.

SAE mode (DLM-Scope): A = encode(h); A[f] += strength * max(A) (or + strength when `scale` is
"fixed"); h' = decode(A) + (h - decode(encode(h))), so the reconstruction error is kept and
strength 0 is exactly the identity. Decoding is affine in A, so this equals
h + bump * W_dec[f] / input_scale, which is how it is computed (one top-k encode, no dense
decode). Direction mode adds strength * W_dec[f] to h.
Schedules pick denoising steps (all, the first fraction, a list) and positions (all, still
masked, generated, or the top-n positions by the feature's activation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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


def validate(spec: SteeringSpec, sae, lm: LoadedModel | None = None, n_steps: int | None = None) -> None:
    """One-line errors for a spec that cannot be applied (to a run of `n_steps` steps, when given)."""
    if not 0 <= spec.feature < sae.cfg.n_latents:
        raise DLMScopeError(f"feature {spec.feature} out of range: the SAE has latents 0..{sae.cfg.n_latents - 1}")
    if not math.isfinite(spec.strength):
        raise DLMScopeError(f"strength {spec.strength} is not finite")
    if spec.mode not in ("sae", "direction") or spec.scale not in ("max", "fixed"):
        raise DLMScopeError(f"mode={spec.mode!r} / scale={spec.scale!r}; allowed: sae|direction and max|fixed")
    pos = spec.positions
    if not (pos in STEER_POSITIONS or (pos.startswith("top:") and pos[4:].isdigit() and int(pos[4:]) > 0)):
        raise DLMScopeError(f"positions={pos!r}; allowed: {', '.join(STEER_POSITIONS)}, top:N (N >= 1)")
    if lm is not None:
        check_sae_matches(lm, sae)
    if pos == "masked" and lm is not None and not lm.is_diffusion:
        raise DLMScopeError(f"positions='masked' needs a diffusion model; {lm.name} has no masked positions")
    if isinstance(spec.steps, str):
        frac = _first_fraction(spec.steps)
        if spec.steps != "all" and not (frac is not None and 0 < frac <= 1):
            raise DLMScopeError(f"steps={spec.steps!r}; allowed: all, first:FRACTION in (0, 1], or a list of steps")
    elif any(not isinstance(v, int) or v < 0 for v in spec.steps):
        raise DLMScopeError(f"steps={list(spec.steps)!r}; a step list holds integers >= 0")
    elif n_steps is not None and any(v >= n_steps for v in spec.steps):
        raise DLMScopeError(f"steps={list(spec.steps)!r}: the run has steps 0..{n_steps - 1}, so step "
                            f"{max(spec.steps)} would never steer")


def _first_fraction(steps: str) -> float | None:
    try:
        return float(steps.split(":", 1)[1]) if steps.startswith("first:") else None
    except ValueError:
        return None


def step_filter(spec: SteeringSpec, lm: LoadedModel):
    """The `steps` argument for `hooks.hooked`: None (all), a step list, or a predicate on the step."""
    if spec.steps == "all":
        return None
    if isinstance(spec.steps, str):
        frac = _first_fraction(spec.steps)
        assert frac is not None  # SteeringSpec checked the spelling
        return lambda step: step < max(1, math.ceil(frac * (lm.state.n_steps or 1)))
    return list(spec.steps)


@contextmanager
def steer(lm: LoadedModel, sae, spec: SteeringSpec, prompt_length: int = 0):
    """Apply `spec` to every forward inside the block (the sampler's or an AR loop's).

    Steps and still-masked positions are restricted by `hooks.hooked`; `generated` and `top:N`
    positions are chosen per forward here. `generated` starts at `prompt_length` (the sampler
    left-pads every prompt to the longest), except in AR decoding (`ar_generate`), which runs one
    unpadded prompt at a time: there the last `step` positions are the generated ones.
    """
    hook = check_sae_matches(lm, sae)
    validate(spec, sae, lm)
    f = spec.feature
    direction = sae.W_dec[f].detach().float() / sae.output_scale
    seen: dict[str, torch.Tensor] = {}  # a transcoder encodes its input hook and writes at its output hook

    def remember(act: torch.Tensor, ctx) -> None:
        seen["x"] = act

    def fn(act: torch.Tensor, ctx) -> torch.Tensor | None:
        if spec.strength == 0:
            return None
        h, x = act.float(), seen.pop("x", act).float()
        d = direction.to(h.device)
        if spec.mode == "direction" or spec.scale == "fixed":
            new = h + spec.strength * d
        else:
            new = h + (spec.strength * sae.encode_topk(x)[0].max(-1).values)[..., None] * d
        B, L = h.shape[:2]
        if spec.positions == "generated":
            offset = ctx.state.window[0] if ctx.state.window else 0  # a KV-cached step sees only its window
            start = prompt_length
            if lm.causal and ctx.state.step is not None:  # AR decoding: step s has appended s tokens to its prompt
                start = L - ctx.state.step
            where = (torch.arange(offset, offset + L, device=h.device) >= start)[None].expand(B, L)
        elif spec.positions.startswith("top:"):
            score = sae.encode(x)[..., f]
            where = torch.zeros(B, L, dtype=torch.bool, device=h.device)
            where.scatter_(1, score.topk(min(int(spec.positions[4:]), L), dim=1).indices, True)
        else:
            return new.to(act.dtype)
        return torch.where(where[..., None], new, h).to(act.dtype)

    out_hook = sae.cfg.hook_name_out
    with hooked(lm, {out_hook: fn} if out_hook == hook else {hook: remember, out_hook: fn}, steps=step_filter(spec, lm),
                positions="masked" if spec.positions == "masked" else None):
        yield


@torch.no_grad()
def ar_generate(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
                seed: int | None = None) -> list[str]:
    """Greedy (temperature 0) or sampled decoding for causal models; token i is denoising 'step' i.

    Full re-forward per token (no KV cache): steering hooks then see every position, as in the sampler.
    """
    from ..diffusion.sampling import gumbel_argmax
    from ..models.base import ForwardState

    if not prompts:
        raise DLMScopeError("the prompt list is empty; give at least one prompt")
    if not lm.causal:
        raise DLMScopeError(f"{lm.name} is a diffusion model; use dlmscope.generate")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    texts = []
    eos = lm.tokenizer.eos_token_id
    try:
        for ids in lm.to_tokens(list(prompts)):
            x = torch.tensor([ids], device=lm.device)
            for step in range(max_new_tokens):
                lm.state = ForwardState(step=step, n_steps=max_new_tokens)
                nxt = gumbel_argmax(lm.forward(x)[:, -1:], temperature, gen)
                x = torch.cat([x, nxt], 1)
                if int(nxt) == eos:
                    break
            new = x[0, len(ids):].tolist()
            texts.append(lm.to_text(new[: new.index(eos)] if eos in new else new))
    finally:
        lm.state = ForwardState()
    return texts


def steered_generate(lm: LoadedModel, sae, spec: SteeringSpec | None, prompts: Sequence[str], gen_length: int = 32,
                     steps: int = 32, seed: int = 0, temperature: float = 0.0, schedule: str | None = None,
                     threshold: float | None = None, cache: str | None = None) -> list[str]:
    """Continuations with (or, spec None, without) steering: the sampler for DLMs, `ar_generate` for AR."""
    from contextlib import nullcontext

    from ..diffusion.sampler import generate, one_block

    if not prompts:
        raise DLMScopeError("the prompt list is empty; give at least one prompt")
    prompt_len = max(len(p) for p in lm.to_tokens(list(prompts)))
    with steer(lm, sae, spec, prompt_len) if spec is not None else nullcontext():
        if lm.causal:
            return ar_generate(lm, prompts, gen_length, temperature, seed)
        out = generate(lm, list(prompts), gen_length=gen_length, steps=steps, block_length=one_block(lm, gen_length),
                       temperature=temperature, seed=seed, schedule=schedule, threshold=threshold, cache=cache)
        assert out.texts is not None  # to_tokens above needs the tokenizer that decodes them
        return out.texts


CONCEPTS = ("output", "logit")
"""How `compare` defines a feature's concept by default: `output_concept` and `logit_concept`."""


@torch.no_grad()
def _position_concept(lm: LoadedModel, sae, feature: int, rows: torch.Tensor, top: int, offset: int) -> list[int]:
    """Token ids credited with the feature's highest mean activation, each activation at position i credited to the
    token at i + offset (clean held-out text; tokens seen fewer than twice are skipped)."""
    hook = check_sae_matches(lm, sae)
    acts = run_with_cache(lm, rows.to(lm.device), [hook])[hook].float()
    a = sae.encode(acts)[..., feature].cpu()[:, :rows.shape[1] - offset].flatten()
    tok = rows[:, offset:].flatten()
    sums = torch.zeros(lm.vocab_size).index_add_(0, tok, a)
    counts = torch.zeros(lm.vocab_size).index_add_(0, tok, torch.ones_like(a))
    mean = sums / counts.clamp_min(1)
    mean[counts < 2] = 0
    return mean.topk(top).indices.tolist()


def output_concept(lm: LoadedModel, sae, feature: int, rows: torch.Tensor, top: int = 20) -> list[int]:
    """The tokens the feature's activation predicts: its activation at position i credited to the token the model
    reads out there (i for masked LMs, i + 1 for causal and shifted ones; `LoadedModel.readout_offset`), so a DLM
    and an AR model are measured on the same side of their readout."""
    return _position_concept(lm, sae, feature, rows, top, lm.readout_offset)


def input_concept(lm: LoadedModel, sae, feature: int, rows: torch.Tensor, top: int = 20) -> list[int]:
    """The tokens at the positions where the feature fires (the definition before `output_concept`). It measures a
    masked LM on its output side and a causal model on its input side; kept to show what that bias did."""
    return _position_concept(lm, sae, feature, rows, top, 0)


@torch.no_grad()
def logit_concept(lm: LoadedModel, sae, feature: int, top: int = 20) -> list[int]:
    """Activation-free: the top tokens of the decoder direction's direct logit attribution (final norm's weight,
    then the unembedding; `LoadedModel.direct_logits`)."""
    check_sae_matches(lm, sae)
    return lm.direct_logits(sae.W_dec[feature].detach().float().cpu()).topk(top).indices.tolist()


def concepts_for(lm: LoadedModel, sae, feature: int, rows: torch.Tensor, top: int = 20) -> dict[str, list[int]]:
    """Both default concepts of a feature (`CONCEPTS`), by name."""
    return {"output": output_concept(lm, sae, feature, rows, top), "logit": logit_concept(lm, sae, feature, top)}


@torch.no_grad()
def steering_metrics(lm: LoadedModel, sae, feature: int, prompts: Sequence[str], continuations: Sequence[str],
                     concepts: Mapping[str, Sequence[int]], ar_judge: LoadedModel | None = None,
                     dlm_judge: LoadedModel | None = None, n_draws: int = 8) -> dict:
    """Judge-free success and fluency of continuations (each after its prompt).

    feature_activation: the feature's mean activation over continuation tokens when prompt +
    continuation is re-encoded by `lm` (clean pass); concept_rate: {name: share of continuation tokens
    among that concept's tokens} per entry of `concepts`; perplexity: exp(NLL per token) of the
    continuation under the AR judge; dlm_nll: the DLM judge's ELBO bound on NLL per continuation token.
    """
    from ..diffusion.loss import log_likelihood

    hook = check_sae_matches(lm, sae)
    concept_sets = {name: set(c) for name, c in concepts.items()}
    acts, hits, n_tok, ar_nll, ar_n, dlm_nll, dlm_n = [], dict.fromkeys(concept_sets, 0), 0, 0.0, 0, 0.0, 0
    gen = torch.Generator().manual_seed(0)
    for prompt, cont in zip(prompts, continuations):
        p_ids, c_ids = lm.to_tokens(prompt)[0], lm.to_tokens(cont, add_bos=False)[0]
        if not c_ids:
            continue
        x = torch.tensor([p_ids + c_ids], device=lm.device)
        h = run_with_cache(lm, x, [hook])[hook].float()
        acts.append(float(sae.encode(h)[0, len(p_ids):, feature].mean()))
        for name, c in concept_sets.items():
            hits[name] += sum(t in c for t in c_ids)
        n_tok += len(c_ids)
        for judge, acc in ((ar_judge, "ar"), (dlm_judge, "dlm")):
            if judge is None:
                continue
            jp, jc = judge.to_tokens(prompt)[0], judge.to_tokens(cont, add_bos=False)[0]
            nll = -log_likelihood(judge, torch.tensor(jp), torch.tensor(jc), n_draws=n_draws, generator=gen)
            if acc == "ar":
                ar_nll, ar_n = ar_nll + nll, ar_n + len(jc)
            else:
                dlm_nll, dlm_n = dlm_nll + nll, dlm_n + len(jc)
    return {"feature_activation": sum(acts) / max(1, len(acts)),
            "concept_rate": {name: h / max(1, n_tok) for name, h in hits.items()},
            "perplexity": math.exp(ar_nll / ar_n) if ar_n else float("nan"),
            "dlm_nll": dlm_nll / dlm_n if dlm_n else float("nan"), "n_texts": len(acts)}


def compare(lm: LoadedModel, sae, spec: SteeringSpec, prompts: Sequence[str], seeds: Sequence[int] = (0,),
            concepts: Mapping[str, Sequence[int]] | None = None, ar_judge: LoadedModel | None = None,
            dlm_judge: LoadedModel | None = None, gen_length: int = 32, steps: int = 32,
            temperature: float = 0.0, schedule: str | None = None, threshold: float | None = None,
            cache: str | None = None) -> dict:
    """Steered vs unsteered side by side over prompts x seeds: metrics of both and the paired samples.

    `concepts` (name -> token ids) defaults to `concepts_for` on 64 held-out rows; {} skips the concept rates."""
    validate(spec, sae, lm, gen_length if lm.causal else steps)
    if not prompts:
        raise DLMScopeError("the prompt list is empty; give at least one prompt")
    if concepts is None:
        from ..data import heldout_rows

        concepts = concepts_for(lm, sae, spec.feature, heldout_rows(lm.tokenizer, 64, 32))
    out: dict = {"feature": spec.feature, "strength": spec.strength, "steps": spec.steps, "positions": spec.positions}
    all_prompts = [p for _ in seeds for p in prompts]
    for label, s in (("unsteered", None), ("steered", spec)):
        conts = [c for seed in seeds for c in steered_generate(lm, sae, s, prompts, gen_length, steps, seed, temperature,
                                                                 schedule, threshold, cache)]
        out[label] = steering_metrics(lm, sae, spec.feature, all_prompts, conts, concepts, ar_judge, dlm_judge)
        out[f"{label}_texts"] = conts
    out["prompts"] = all_prompts
    return out
