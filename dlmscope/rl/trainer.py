"""RL post-training of a masked diffusion LM on a verifiable task: `dlmscope rspo`.

A step samples `prompts_per_step` train prompts, `group_size` completions each (our sampler, temperature
> 0), scores them with the task and takes `inner_iters` optimiser steps on RSPO's or diffu-GRPO's loss
against a frozen (optionally refreshed) reference. Checkpoints are LLaDA-format folders (`load_model`
reads them, tokenizer included) plus one trainer state (policy, reference, optimizer, RNG, log) for
`--resume`; every file is written atomically.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..diffusion.sampler import check_fast_options, check_threshold, get_schedule
from ..models.kvcache import check_cache
from ..errors import DLMScopeError
from ..io_utils import atomic_torch_save, atomic_write_json, atomic_write_text
from ..models.zoo import DEFAULT_MODEL
from .losses import elbo_draws, elbo_logp, grpo_loss, one_step_input, rspo_loss, token_logp
from .rollout import Rollout, evaluate, sample_groups

ALGORITHMS = ("rspo", "diffu-grpo")


@dataclass
class RLConfig:
    """An RL run; every field is a `dlmscope rspo` flag."""

    model: str = DEFAULT_MODEL
    """Starting checkpoint (LLaDA-format folder or built-in name)."""
    ref: str = ""
    """Reference checkpoint (empty: a frozen copy of --model); must share architecture and tokenizer."""
    algo: str = "rspo"
    """rspo or diffu-grpo."""
    task: str = "sudoku"
    """Verifiable task: sudoku or countdown."""
    min_empty: int = 10
    """Sudoku: fewest empty cells (the tiny DLM solves easier puzzles already)."""
    max_empty: int = 12
    """Sudoku: most empty cells (12 is the most a uniquely solvable 4x4 puzzle allows)."""
    steps: int = 30
    """Rollout steps (each takes inner_iters optimiser steps)."""
    prompts_per_step: int = 4
    """Prompts per rollout step."""
    group_size: int = 6
    """Completions per prompt, G >= 2 (advantages are relative to the group)."""
    inner_iters: int = 1
    """Optimiser steps per rollout batch (d1's mu); each uses fresh masks."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (each holds whole prompt groups)."""
    lr: float = 5e-5
    """AdamW learning rate (no weight decay); gradients clipped to norm 1."""
    lam: float = 0.1
    """RSPO lambda: d_hat regresses onto A/lambda; 0.1 keeps the target within ~±5 nats for rewards in [0, 1]."""
    mc_draws: int = 2
    """RSPO mask draws per completion (shared by policy and reference)."""
    normalise_adv: bool = False
    """Divide advantages by the group's reward std (GRPO style); off keeps RSPO's target in reward units."""
    clip: float = 0.2
    """diffu-GRPO ratio clip epsilon."""
    beta: float = 0.04
    """diffu-GRPO k3-KL coefficient."""
    prompt_mask_p: float = 0.15
    """diffu-GRPO prompt masking probability."""
    temperature: float = 1.0
    """Rollout sampling temperature (> 0, or groups collapse to one completion)."""
    gen_length: int = 16
    """Completion length in tokens (one block)."""
    denoise_steps: int = 16
    """Sampler steps per rollout and evaluation."""
    schedule: str | None = None
    """Sampler schedule of rollouts and evaluation: linear or dream (unset: the model family's own)."""
    threshold: float = 0.0
    """Fast-dLLM threshold decoding for rollouts and evaluation, in (0, 1] (0 = off)."""
    cache: str | None = None
    """Fast-dLLM block KV cache for rollouts and evaluation: prefix or dual (unset = off)."""
    ref_refresh: int = 0
    """Copy the policy into the reference every N rollout steps (0 = frozen)."""
    eval_n: int = 50
    """Test-split examples evaluated greedily."""
    eval_every: int = 0
    """Evaluate every N rollout steps (0 = only before and after training)."""
    checkpoint_every: int = 10
    """Rollout steps between checkpoints (the last step is always saved)."""
    out: str = "runs/rl"
    """Output folder (checkpoint-NNNNN/, trainer_state.pt, log.json, curves.html)."""
    resume: bool = False
    """Continue from the folder's trainer state."""
    seed: int = 0
    """Seed for prompts, rollouts and masks."""
    device: str = "cpu"
    """Torch device."""


def check_config(cfg: RLConfig) -> None:
    """One-line errors for values the run cannot use."""
    if cfg.algo not in ALGORITHMS:
        raise DLMScopeError(f"unknown algo {cfg.algo!r}; allowed: {', '.join(ALGORITHMS)}")
    if cfg.group_size < 2:
        raise DLMScopeError(f"group_size={cfg.group_size}: group advantages need at least 2 completions per prompt")
    if cfg.prompts_per_step < 1 or cfg.prompts_per_step % max(cfg.grad_accum, 1):
        raise DLMScopeError(f"prompts_per_step={cfg.prompts_per_step} must be >= 1 and divisible by grad_accum={cfg.grad_accum}")
    if cfg.temperature <= 0:
        raise DLMScopeError(f"temperature={cfg.temperature}: rollouts need temperature > 0 for groups to differ")
    for name in ("steps", "inner_iters", "grad_accum", "mc_draws", "gen_length", "denoise_steps", "checkpoint_every", "eval_n"):
        if getattr(cfg, name) < 1:
            raise DLMScopeError(f"{name}={getattr(cfg, name)} must be >= 1")
    if cfg.lam <= 0:
        raise DLMScopeError(f"lam={cfg.lam} must be > 0 (the target is A / lambda)")
    if cfg.schedule is not None:
        get_schedule(cfg.schedule)
    check_threshold(cfg.threshold or None)
    check_cache(None, cfg.cache)


def make_task(cfg: RLConfig):
    from ..tasks import get_task

    return get_task("sudoku", min_empty=cfg.min_empty, max_empty=cfg.max_empty) if cfg.task == "sudoku" else get_task(cfg.task)


def _rspo_update(policy, ref, roll: Rollout, opt, cfg: RLConfig, gen: torch.Generator) -> dict:
    slices = _micro_batches(roll.seqs.shape[0], cfg.grad_accum)
    losses, log_ratio = [], []
    for _ in range(cfg.inner_iters):
        draws = elbo_draws(roll.seqs, roll.completion, policy.mask_id, cfg.mc_draws, gen)
        with torch.no_grad():
            ref_lp = torch.cat([elbo_logp(ref, roll.seqs, roll.attn, draws, sl) for sl in slices])
            center = None
            if len(slices) > 1:  # exact full-batch centring under accumulation (see rspo_loss)
                center = (torch.cat([elbo_logp(policy, roll.seqs, roll.attn, draws, sl) for sl in slices]) - ref_lp).mean()
        opt.zero_grad(set_to_none=True)
        total, ds = 0.0, []
        for sl in slices:
            d = elbo_logp(policy, roll.seqs, roll.attn, draws, sl) - ref_lp[sl]
            loss = rspo_loss(d, roll.advantages[sl].to(d.device), cfg.lam, center) / len(slices)
            loss.backward()
            total += float(loss.detach())
            ds.append(d.detach())
        _step(policy, opt)
        losses.append(total)
        log_ratio.append(float(torch.cat(ds).mean()))
    return {"loss": sum(losses) / len(losses), "log_ratio": log_ratio[0]}


def _grpo_update(policy, ref, roll: Rollout, opt, cfg: RLConfig, gen: torch.Generator) -> dict:
    slices = _micro_batches(roll.seqs.shape[0], cfg.grad_accum)
    inputs = [one_step_input(roll.seqs, roll.attn, roll.completion, policy.mask_id, cfg.prompt_mask_p, gen)
              for _ in range(cfg.inner_iters)]
    comp = roll.completion.float()
    with torch.no_grad():  # reference and pre-update ("old") log-probs, on each iteration's own mask
        ref_lp = [torch.cat([token_logp(ref, x[sl], roll.seqs[sl], roll.attn[sl]) for sl in slices]) for x in inputs]
        old_lp = [torch.cat([token_logp(policy, x[sl], roll.seqs[sl], roll.attn[sl]) for sl in slices]) for x in inputs] \
            if cfg.inner_iters > 1 else None
    losses, first = [], []
    for k, x in enumerate(inputs):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for sl in slices:
            lp = token_logp(policy, x[sl], roll.seqs[sl], roll.attn[sl])
            old = old_lp[k][sl] if old_lp is not None else lp.detach()
            loss = grpo_loss(lp, old, ref_lp[k][sl], roll.advantages[sl].to(lp.device), comp[sl], cfg.clip, cfg.beta)
            (loss / len(slices)).backward()
            total += float(loss.detach()) / len(slices)
            if k == 0:
                first.append(lp.detach())
        _step(policy, opt)
        losses.append(total)
    # one-step estimate of log pi - log pi_ref per sequence before this step's update (the drift curve)
    return {"loss": sum(losses) / len(losses), "log_ratio": float(((torch.cat(first) - ref_lp[0]) * comp).sum(1).mean())}


def _micro_batches(n: int, k: int) -> list[slice]:
    per = n // k
    return [slice(i, i + per) for i in range(0, n, per)]


def _step(policy, opt) -> None:
    torch.nn.utils.clip_grad_norm_(policy.module.parameters(), 1.0)
    opt.step()


def _rng_state(rng: random.Random) -> dict:
    return {"py": rng.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(rng: random.Random, state: dict) -> None:
    rng.setstate(state["py"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_rl(cfg: RLConfig, task=None) -> dict:
    """Run RSPO or diffu-GRPO; returns the log (also in `out/log.json`). `task` overrides `cfg.task`."""
    from ..analysis.stability import check_compatible
    from ..models import load_model
    from ..models.llada import save_llada

    check_config(cfg)
    task = task if task is not None else make_task(cfg)
    out = Path(cfg.out)
    state_path = out / "trainer_state.pt"
    if cfg.resume and not state_path.is_file():
        raise DLMScopeError(f"--resume given but {str(state_path)!r} does not exist")
    policy = load_model(cfg.model, device=cfg.device)
    if policy.family != "llada":
        raise DLMScopeError(f"RL writes LLaDA-format checkpoints; {policy.name} is a {policy.family} model")
    policy.require_mask_id()
    fast = {"threshold": cfg.threshold or None, "cache": cfg.cache}
    check_fast_options(policy, **fast)
    if cfg.ref:
        ref = load_model(cfg.ref, device=cfg.device)
        check_compatible(policy, ref)
    else:
        ref = copy.deepcopy(policy)
    ref.module.eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.module.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    eval_examples = task.examples("test", cfg.eval_n, seed=0)
    pool = task.examples("train", 2000, seed=cfg.seed)

    def run_eval(step: int) -> dict:
        policy.module.eval()
        r = {"step": step, **evaluate(policy, task, eval_examples, gen_length=cfg.gen_length, steps=cfg.denoise_steps,
                                           schedule=cfg.schedule, **fast)}
        log["eval"].append(r)
        return r

    start = 0
    if cfg.resume:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        try:
            policy.module.load_state_dict(state["policy"])
            ref.module.load_state_dict(state["ref"])
        except RuntimeError:
            raise DLMScopeError(f"{str(state_path)!r} was written for a different architecture than {cfg.model!r}") from None
        opt.load_state_dict(state["opt"])
        log, start = state["log"], state["step"]
        _set_rng_state(rng, state["rng"])
    else:
        log = {"config": asdict(cfg), "steps": [], "eval": []}
        log["before"] = run_eval(0)

    def save(step: int) -> None:
        save_llada(policy.module, out / f"checkpoint-{step:05d}", mask_id=policy.mask_id, tokenizer=policy.tokenizer)
        atomic_torch_save(state_path, {"policy": policy.module.state_dict(), "ref": ref.module.state_dict(),
                                       "opt": opt.state_dict(), "log": log, "step": step, "rng": _rng_state(rng)})
        atomic_write_json(out / "log.json", log)
        write_curves(out, log)

    from tqdm import tqdm

    update = _rspo_update if cfg.algo == "rspo" else _grpo_update
    for step in tqdm(range(start, cfg.steps), desc=f"{cfg.algo} on {getattr(task, 'name', 'task')}",
                     initial=start, total=cfg.steps):
        t0 = time.perf_counter()
        policy.module.eval()
        roll = sample_groups(policy, task, rng.sample(pool, cfg.prompts_per_step), cfg.group_size,
                             gen_length=cfg.gen_length, steps=cfg.denoise_steps, temperature=cfg.temperature,
                             seed=rng.randrange(2**31), normalise=cfg.normalise_adv, schedule=cfg.schedule, **fast)
        t1 = time.perf_counter()
        policy.module.train()
        stats = update(policy, ref, roll, opt, cfg, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
        if cfg.ref_refresh and (step + 1) % cfg.ref_refresh == 0:
            ref.module.load_state_dict(policy.module.state_dict())
        flat = roll.rewards.view(-1, cfg.group_size)
        log["steps"].append({"step": step + 1, "reward": float(roll.rewards.mean()), "accuracy": float(roll.correct.float().mean()),
                             "constant_groups": float((flat.max(1).values == flat.min(1).values).float().mean()),
                             **stats, "sample_s": t1 - t0, "update_s": time.perf_counter() - t1})
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            run_eval(step + 1)
        if step + 1 == cfg.steps:
            log["after"] = run_eval(step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save(step + 1)
    policy.module.eval()
    if "after" not in log:  # resumed a finished run
        log["after"] = log["eval"][-1]
    atomic_write_json(out / "log.json", log)
    write_curves(out, log)
    return log


def write_curves(out: Path, log: dict) -> Path:
    """Plotly HTML: rollout reward/accuracy per step and test-split reward/accuracy at each evaluation."""
    import plotly.graph_objects as go

    steps = [s["step"] for s in log["steps"]]
    fig = go.Figure()
    for key in ("reward", "accuracy"):
        fig.add_trace(go.Scatter(x=steps, y=[s[key] for s in log["steps"]], name=f"rollout {key}", mode="lines"))
        fig.add_trace(go.Scatter(x=[e["step"] for e in log["eval"]], y=[e[key] for e in log["eval"]],
                                 name=f"test {key} (greedy)", mode="lines+markers"))
    fig.update_layout(title=f"{log['config']['algo']} on {log['config']['task']}", xaxis_title="rollout step")
    return atomic_write_text(out / "curves.html", fig.to_html(include_plotlyjs=True))
