"""Decoding order through an SAE: feature dynamics per remasking strategy, and an SAE-informed strategy.

Per position, the SAE's top-k latent set is tracked across denoising steps. Pre-mask stability
is the mean Jaccard similarity of consecutive steps' sets while the position is still masked;
post-decode drift is 1 - Jaccard(set when decoded, set at each later step). Held-out likelihood
per order: the held-out answer is revealed in the order the strategy picks (teacher forced), and
the log-probabilities of the true tokens at the revealed positions are summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..checks import positive
from ..diffusion.loss import token_ce
from ..diffusion.remasking import REMASKING, LowConfidence, Remasking, StepInput, check_threshold, get_remasking
from ..diffusion.sampler import generate, one_block
from ..diffusion.schedules import default_schedule, get_schedule
from ..diffusion.stepforward import StepForward
from ..errors import DLMScopeError
from ..hooks import hooked
from ..models.base import ForwardState, LoadedModel
from .splice import check_sae_matches

STANDARD_ORDERS = ("origin", "low_confidence", "topk_margin", "entropy")


def jaccard(a: torch.Tensor, b: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Row-wise Jaccard similarity of index sets a, b (..., k)."""
    ma = torch.zeros(*a.shape[:-1], n_latents, dtype=torch.bool).scatter_(-1, a, True)
    mb = torch.zeros(*b.shape[:-1], n_latents, dtype=torch.bool).scatter_(-1, b, True)
    inter = (ma & mb).sum(-1).float()
    union = (ma | mb).sum(-1).float().clamp_min(1)
    return inter / union


def order_metrics(sets: torch.Tensor, masks: torch.Tensor, n_latents: int) -> dict:
    """Metrics from feature sets (S, B, L, k) and mask states (S, B, L) of one trajectory."""
    S = sets.shape[0]
    sim = torch.stack([jaccard(sets[s], sets[s + 1], n_latents) for s in range(S - 1)])  # (S-1, B, L)
    both_masked = masks[:-1] & masks[1:]
    pre = float(sim[both_masked].mean()) if both_masked.any() else float("nan")
    pre_pos = ((sim * both_masked).sum((0, 1)) / both_masked.sum((0, 1)).clamp_min(1)).tolist()
    # the step whose forward last saw the position masked, i.e. the step that decoded it
    decoded_at = torch.where(masks.any(0), masks.sum(0) - 1, torch.full_like(masks[0], -1, dtype=torch.long))
    drift = torch.full(decoded_at.shape, float("nan"))
    for b, pos in zip(*torch.nonzero(decoded_at >= 0, as_tuple=True)):
        d = int(decoded_at[b, pos])
        if d < S - 1:
            ref = sets[d, b, pos]
            later = sets[d + 1:, b, pos]
            drift[b, pos] = 1 - jaccard(ref.expand_as(later), later, n_latents).mean()
    seen = ~drift.isnan()
    unique_per_step = [int(torch.unique(sets[s]).numel()) for s in range(S)]
    return {"pre_mask_stability": pre, "post_decode_drift": float(drift[seen].mean()) if seen.any() else float("nan"),
            "unique_features_per_step": unique_per_step, "pre_mask_stability_per_position": pre_pos,
            "post_decode_drift_per_position": [float(v) if v == v else float("nan")
                                               for v in drift.nan_to_num(0).sum(0) / seen.sum(0).clamp_min(1)],
            "decoded_at_step_mean": decoded_at.float().mean(0).tolist()}


@torch.no_grad()
def feature_dynamics(lm: LoadedModel, saes, prompts: Sequence[str], remasking, gen_length: int = 32,
                     steps: int = 32, seed: int = 0, schedule: str | None = None, threshold: float | None = None,
                     cache: str | None = None) -> dict:
    """Run the sampler once and measure how each SAE's features of generated positions evolve.

    `saes` is one SAE or a list of SAEs on different hooks (layers); results are keyed by hook, with
    the metrics of each sequence alone under `per_sequence`. `sampler` holds further `generate`
    options (schedule, threshold, cache). Under a KV cache a step does not recompute every position;
    those keep the features of the last forward that computed them (what the cached model uses).
    """
    saes = list(saes) if isinstance(saes, (list, tuple)) else [saes]
    if not prompts:
        raise DLMScopeError("the prompt list is empty; give at least one prompt")
    hooks = [check_sae_matches(lm, sae) for sae in saes]
    sets: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}

    def make_grab(hook: str, sae):
        def grab(act: torch.Tensor, ctx) -> None:
            latents = sae.encode_topk(act.float())[1].cpu()
            if ctx.state.window is not None:
                start, end = ctx.state.window
                latents, fresh = sets[hook][-1].clone(), latents
                latents[:, start:end] = fresh
            sets[hook].append(latents)

        return grab

    with hooked(lm, {h: make_grab(h, sae) for h, sae in zip(hooks, saes)}):
        out = generate(lm, list(prompts), gen_length=gen_length, steps=steps,
                         block_length=one_block(lm, gen_length),
                       remasking=remasking, return_history=True, seed=seed, schedule=schedule, threshold=threshold,
                       cache=cache)
    P = out.prompt_length
    masks = torch.stack([h.mask[:, P:].cpu() for h in out.history])
    layers = {}
    for hook, sae in zip(hooks, saes):
        s = torch.stack(sets[hook])[:, :, P:]
        layers[hook] = order_metrics(s, masks, sae.cfg.n_latents)
        per_seq = [order_metrics(s[:, b:b + 1], masks[:, b:b + 1], sae.cfg.n_latents) for b in range(s.shape[1])]
        layers[hook]["per_sequence"] = {k: [m[k] for m in per_seq] for k in ("pre_mask_stability", "post_decode_drift")}
    name = remasking if isinstance(remasking, str) else remasking.name
    return {"remasking": name, "layers": layers, "texts": out.texts, "forwards": out.n_forwards}


class FeatureStability(LowConfidence):
    """SAE-informed remasking: confidence times (1 + alpha * feature stability).

    A position whose top-k SAE features did not change since the previous step is treated as
    settled and unmasked earlier; a position still churning waits.
    """

    name = "sae_stability"

    def __init__(self, sae, alpha: float = 1.0):
        self.sae, self.alpha = sae, alpha
        self.prev: torch.Tensor | None = None
        self.current: torch.Tensor | None = None
        self._ctx: AbstractContextManager | None = None

    def begin(self, lm: LoadedModel, x: torch.Tensor) -> None:
        hook = check_sae_matches(lm, self.sae)
        self.prev = self.current = None

        def grab(act: torch.Tensor, ctx) -> None:
            sets = self.sae.encode_topk(act.float())[1]
            if ctx.state.window is not None:  # a KV-cached step: positions outside the window keep their sets
                start, end = ctx.state.window
                assert self.current is not None  # a block's first step runs uncached
                sets, fresh = self.current.clone(), sets
                sets[:, start:end] = fresh
            self.current = sets

        self._ctx = ctx = hooked(lm, {hook: grab})
        ctx.__enter__()

    def end(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def scores(self, s: StepInput) -> torch.Tensor:
        conf = super().scores(s)
        assert self.current is not None  # the hook ran in this step's forward
        cur = self.current[: s.x.shape[0]]
        if self.prev is None:
            stability = torch.zeros_like(conf)
        else:
            stability = jaccard(cur.cpu(), self.prev.cpu(), self.sae.cfg.n_latents).to(conf)
        self.prev = cur
        return conf * (1 + self.alpha * stability)


def strategy_names() -> list[str]:
    """Every remasking order `make_strategy` accepts: the sampler's and the SAE-informed one."""
    return [*REMASKING, FeatureStability.name]


def make_strategy(name: str, sae=None):
    if name == FeatureStability.name:
        if sae is None:
            raise DLMScopeError("the sae_stability strategy needs an SAE")
        return FeatureStability(sae)
    if name not in REMASKING:
        raise DLMScopeError(f"unknown remasking {name!r}; allowed: {', '.join(strategy_names())}")
    return name


@torch.no_grad()
def task_accuracy(lm: LoadedModel, task_name: str, strategy, n: int = 50, steps: int = 16, gen_length: int = 16,
                  seed: int = 0, batch: int = 25, schedule: str | None = None, threshold: float | None = None,
                  cache: str | None = None) -> dict:
    """Exact accuracy and mean reward of a remasking strategy on a task's test split.

    Per example: `correct` and `forwards`, the forward passes its row needed (steps in which it still
    had a masked position; a batch runs until its slowest row is done). `schedule`, `threshold` and
    `cache` are the sampler's.
    """
    from ..tasks import get_task

    positive("n", n)
    task = get_task(task_name)
    examples = task.examples("test", n, seed=seed)
    rewards, correct, forwards = [], [], []
    for i in range(0, n, batch):
        chunk = examples[i:i + batch]
        busy = torch.zeros(len(chunk), dtype=torch.long)

        def count(rec) -> None:
            busy.add_(rec.mask.cpu().any(1).long())

        texts = generate(lm, [e.prompt for e in chunk], gen_length=gen_length, steps=steps,
                         block_length=one_block(lm, gen_length),
                         remasking=strategy, seed=seed, schedule=schedule, threshold=threshold, cache=cache,
                         callback=count).texts
        assert texts is not None
        rewards += [task.reward(e, t) for e, t in zip(chunk, texts)]
        correct += [task.is_correct(e, t) for e, t in zip(chunk, texts)]
        forwards += busy.tolist()
    return {"accuracy": sum(correct) / n, "reward": sum(rewards) / n, "correct": [bool(c) for c in correct],
            "forwards": forwards}


@torch.no_grad()
def order_log_likelihood(lm: LoadedModel, rows: torch.Tensor, prompt_length: int, remasking: str | Remasking,
                         steps: int, seed: int = 0, schedule: str | None = None, *, threshold: float | None = None,
                         cache: str | None = None, return_forwards: bool = False):
    """(B,) NLL per answer token of held-out rows when the answer (after `prompt_length`) is revealed
    in the strategy's order, `steps` steps with the sampler's schedule (teacher forced; None: the family's own).

    Each step's revealed tokens are scored jointly from the same forward (the sampler's parallel
    factorisation), so fewer steps cost likelihood; the order is what the strategy picks from the
    model's own predictions. `threshold` and `cache` are the sampler's fast decoding (one block:
    the answer); with `return_forwards`, also the (B,) forward passes each row needed.
    """
    mask_id = lm.require_mask_id()
    rows = rows.to(lm.device)
    B, L = rows.shape
    if B == 0:
        raise DLMScopeError("no held-out rows to score; give at least one")
    n = L - prompt_length
    if not 1 <= steps <= n:
        raise DLMScopeError(f"steps={steps} out of range: need 1 <= steps <= answer length ({n})")
    strategy = get_remasking(remasking)
    check_threshold(threshold, strategy)
    forward = StepForward(lm, cache)
    gen = torch.Generator().manual_seed(seed)
    x = rows.clone()
    x[:, prompt_length:] = mask_id
    rule = get_schedule(default_schedule(lm) if schedule is None else schedule)
    sched = rule.plan(torch.full((B,), n, device=lm.device), steps)
    attn = torch.ones_like(x)
    nll = torch.zeros(B, device=lm.device)
    busy = torch.zeros(B, dtype=torch.long, device=lm.device)
    n_steps = n if threshold is not None else steps
    strategy.begin(lm, x)
    try:
        i = 0
        while (x == mask_id).any() if threshold is not None else i < steps:
            mask = x == mask_id
            state = ForwardState(i, n_steps, 0, mask, float(mask[:, prompt_length:].float().mean()))
            logits = forward(x, attn, state, prompt_length, L, i == 0, clean=rows)
            x0 = torch.where(mask, logits.argmax(-1), x)
            s = StepInput(lm, x, logits, x0, mask, i, n_steps, i, steps, gen, schedule=rule)
            if threshold is None:
                _, transfer = strategy.select(s, sched[:, i])
            else:
                _, transfer = strategy.select_above(s, threshold)
            nll += (token_ce(logits, rows) * transfer).sum(1)
            busy += mask.any(1)
            x = torch.where(transfer, rows, x)
            i += 1
    finally:
        strategy.end()
        lm.state = ForwardState()
    return (nll.cpu() / n, busy.cpu()) if return_forwards else nll.cpu() / n


def order_study(lm: LoadedModel, saes, prompts: Sequence[str], strategies: Sequence[str], task: str | None = None,
                n: int = 50, budgets: Sequence[int] = (4, 8, 16), gen_length: int = 16,
                rows: torch.Tensor | None = None, schedule: str | None = None, threshold: float | None = None, cache: str | None = None,
                on_row=None) -> dict:
    """The `dlmscope order` study: per remasking order (the SAE-informed ones use the last SAE), the feature
    dynamics of every SAE over `prompts` (one token per step), the task's accuracy (`task`, unless None) and
    the held-out NLL of `rows` (unless None) at each step budget. `on_row(name, table_row)` sees each order's
    row of `order_table` as soon as it is done."""
    fast: dict[str, Any] = {"threshold": threshold, "cache": cache}
    result: dict = {"dynamics": {}, "task": {}, "heldout_nll": {}}
    hooks = [s.cfg.hook_name for s in saes]
    for name in strategies:
        dyn = feature_dynamics(lm, saes, prompts, make_strategy(name, saes[-1]), gen_length=gen_length,
                               steps=gen_length, schedule=schedule, **fast)
        acc = {b: task_accuracy(lm, task, make_strategy(name, saes[-1]), n=n, steps=b, gen_length=gen_length,
                                schedule=schedule, **fast) for b in budgets} if task else {}
        nll = {b: float(order_log_likelihood(lm, rows, gen_length, make_strategy(name, saes[-1]), b,
                                             schedule=schedule, **fast).mean()) for b in budgets} \
            if rows is not None else {}
        result["dynamics"][name], result["task"][name], result["heldout_nll"][name] = dyn["layers"], acc, nll
        if on_row is not None:
            on_row(name, _order_row(result, name, hooks))
    return result


def order_header(lm: LoadedModel, saes, task: str | None, budgets: Sequence[int], heldout: bool) -> str:
    """The Markdown header (two lines) of `order_study`'s table (one stability and drift column per SAE)."""
    hooks = [s.cfg.hook_name for s in saes]
    head = "".join(f" L{lm.layer_of(h)} stability | L{lm.layer_of(h)} drift |" for h in hooks)
    head += "".join(f" {task} @{b} |" for b in budgets if task) + "".join(f" NLL @{b} |" for b in budgets if heldout)
    return f"| order |{head}\n|---|" + "---|" * head.count("|")


def _order_row(result: dict, name: str, hooks: Sequence[str]) -> str:
    layers, acc, nll = result["dynamics"][name], result["task"][name], result["heldout_nll"][name]
    cells = "".join(f" {layers[h]['pre_mask_stability']:.3f} | {layers[h]['post_decode_drift']:.3f} |" for h in hooks)
    return (f"| {name} |{cells}" + "".join(f" {acc[b]['accuracy']:.2f} |" for b in acc)
            + "".join(f" {nll[b]:.3f} |" for b in nll))
