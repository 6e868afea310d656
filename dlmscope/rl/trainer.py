"""RL post-training of a masked diffusion LM on a verifiable task: `dlmscope rspo`.

Each step samples `prompts_per_step` task prompts, G completions each with our sampler, scores them,
and takes one optimiser step on RSPO's or diffu-GRPO's loss against a frozen reference. Checkpoints
are LLaDA-format folders (`load_model` reads them) plus a trainer state for `--resume`.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..diffusion.sampler import generate
from ..errors import DLMScopeError
from ..io_utils import atomic_torch_save, atomic_write_json, atomic_write_text
from ..models.zoo import DEFAULT_MODEL
from .losses import completion_masks, elbo_logp, grpo_loss, group_advantages, one_step_logp, rspo_loss

ALGORITHMS = ("rspo", "diffu-grpo")


@dataclass
class RLConfig:
    """An RL run; every field is a CLI flag."""

    model: str = DEFAULT_MODEL
    """Starting checkpoint (LLaDA-format folder or built-in name)."""
    algo: str = "rspo"
    """rspo or diffu-grpo."""
    task: str = "sudoku"
    """Verifiable task: sudoku or countdown."""
    min_empty: int = 10
    """Sudoku: fewest empty cells (harder puzzles leave room to improve)."""
    max_empty: int = 12
    """Sudoku: most empty cells."""
    steps: int = 30
    """Optimiser steps."""
    prompts_per_step: int = 4
    """Prompts per step."""
    group_size: int = 6
    """Completions per prompt (G >= 2)."""
    grad_accum: int = 1
    """Micro-batches (prompt groups split evenly) per optimiser step."""
    lr: float = 5e-5
    """AdamW learning rate."""
    lam: float = 0.1
    """RSPO lambda: the log-ratio target is A / lambda."""
    mc_draws: int = 2
    """RSPO mask draws per completion (shared by policy and reference)."""
    clip: float = 0.2
    """diffu-GRPO ratio clip."""
    beta: float = 0.04
    """diffu-GRPO k3-KL coefficient."""
    prompt_mask_p: float = 0.15
    """diffu-GRPO prompt masking probability."""
    temperature: float = 1.0
    """Sampling temperature for rollouts."""
    gen_length: int = 16
    """Completion length."""
    denoise_steps: int = 16
    """Sampler steps per rollout."""
    ref_refresh: int = 0
    """Copy the policy into the reference every N steps (0 = frozen)."""
    eval_n: int = 50
    """Test-split examples evaluated greedily at the start and end."""
    checkpoint_every: int = 10
    """Steps between checkpoints."""
    out: str = "runs/rl"
    """Output folder."""
    resume: bool = False
    """Continue from the folder's trainer state."""
    seed: int = 0
    """Seed for prompts, rollouts and masks."""
    device: str = "cpu"
    """Torch device."""


def evaluate(lm, task, n: int, cfg: RLConfig) -> dict:
    """Greedy exact accuracy and mean reward on the task's test split."""
    examples = task.examples("test", n, seed=0)
    texts = generate(lm, [e.prompt for e in examples], gen_length=cfg.gen_length, steps=cfg.denoise_steps,
                     block_length=cfg.gen_length).texts
    return {"accuracy": sum(task.is_correct(e, t) for e, t in zip(examples, texts)) / n,
            "reward": sum(task.reward(e, t) for e, t in zip(examples, texts)) / n}


def train_rl(cfg: RLConfig, task=None) -> dict:
    """Run RSPO or diffu-GRPO; returns the log (also written to `out/log.json`)."""
    from ..models import load_model
    from ..models.llada import save_llada
    from ..tasks import Sudoku, get_task

    if cfg.algo not in ALGORITHMS:
        raise DLMScopeError(f"unknown algo {cfg.algo!r}; allowed: {', '.join(ALGORITHMS)}")
    if cfg.group_size < 2:
        raise DLMScopeError(f"group_size={cfg.group_size}: group advantages need at least 2 completions per prompt")
    if cfg.prompts_per_step % cfg.grad_accum:
        raise DLMScopeError(f"prompts_per_step={cfg.prompts_per_step} is not divisible by grad_accum={cfg.grad_accum}")
    if task is None:
        task = Sudoku(cfg.min_empty, cfg.max_empty) if cfg.task == "sudoku" else get_task(cfg.task)
    out = Path(cfg.out)
    state_path = out / "trainer_state.pt"
    policy = load_model(cfg.model, device=cfg.device)
    if policy.family != "llada":
        raise DLMScopeError(f"RL checkpoints are written in LLaDA format; {policy.name} is {policy.family}")
    ref = copy.deepcopy(policy)
    for p in ref.module.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(policy.module.parameters(), lr=cfg.lr, weight_decay=0.0)
    log = {"config": asdict(cfg), "steps": []}
    start = 0
    if cfg.resume:
        if not state_path.is_file():
            raise DLMScopeError(f"--resume given but {str(state_path)!r} does not exist")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        policy.module.load_state_dict(state["policy"])
        ref.module.load_state_dict(state["ref"])
        opt.load_state_dict(state["opt"])
        log, start = state["log"], state["step"]
        random.setstate(state["py_rng"])
        torch.set_rng_state(state["torch_rng"])
    else:
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        policy.module.eval()
        log["before"] = evaluate(policy, task, cfg.eval_n, cfg)
    pool = task.examples("train", 2000, seed=cfg.seed)

    def save(step: int) -> None:
        folder = out / f"checkpoint-{step:05d}"
        save_llada(policy.module, folder, mask_id=policy.mask_id, tokenizer=policy.tokenizer)
        atomic_torch_save(state_path, {"policy": policy.module.state_dict(), "ref": ref.module.state_dict(),
                                       "opt": opt.state_dict(), "log": log, "step": step,
                                       "py_rng": random.getstate(), "torch_rng": torch.get_rng_state()})
        atomic_write_json(out / "log.json", log)

    from tqdm import tqdm

    for step in tqdm(range(start, cfg.steps), desc=f"{cfg.algo} on {getattr(task, 'name', 'task')}",
                     initial=start, total=cfg.steps):
        t0 = time.perf_counter()
        examples = random.sample(pool, cfg.prompts_per_step)
        policy.module.eval()
        prompts = [e.prompt for e in examples for _ in range(cfg.group_size)]
        gen = generate(policy, prompts, gen_length=cfg.gen_length, steps=cfg.denoise_steps,
                       block_length=cfg.gen_length, temperature=cfg.temperature, seed=random.randrange(2**31))
        rewards = torch.tensor([task.reward(e, t) for e, t in
                                zip([e for e in examples for _ in range(cfg.group_size)], gen.texts)])
        adv = group_advantages(rewards, cfg.group_size)
        t_sample = time.perf_counter() - t0
        policy.module.train()
        seqs, attn = gen.sequences.to(policy.device), gen.attention_mask.to(policy.device)
        completion = torch.zeros_like(seqs, dtype=torch.bool)
        completion[:, gen.prompt_length:] = True
        opt.zero_grad(set_to_none=True)
        per = len(prompts) // cfg.grad_accum
        total_loss = 0.0
        mask_gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        for i in range(0, len(prompts), per):
            sl = slice(i, i + per)
            a = adv[sl].to(policy.device)
            if cfg.algo == "rspo":
                masks, t = completion_masks(completion[sl].cpu(), cfg.mc_draws, mask_gen)
                with torch.no_grad():
                    ref_lp = elbo_logp(ref, seqs[sl], attn[sl], masks, t)
                d = elbo_logp(policy, seqs[sl], attn[sl], masks, t) - ref_lp
                loss = rspo_loss(d, a, cfg.lam)
            else:
                state = torch.Generator().manual_seed(cfg.seed * 104729 + step * 31 + i)
                lp = one_step_logp(policy, seqs[sl], attn[sl], completion[sl], cfg.prompt_mask_p, state)
                with torch.no_grad():
                    state = torch.Generator().manual_seed(cfg.seed * 104729 + step * 31 + i)
                    ref_lp = one_step_logp(ref, seqs[sl], attn[sl], completion[sl], cfg.prompt_mask_p, state)
                loss = grpo_loss(lp, lp.detach(), ref_lp, a, completion[sl].float(), cfg.clip, cfg.beta)
            (loss / cfg.grad_accum).backward()
            total_loss += float(loss.detach()) / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(policy.module.parameters(), 1.0)
        opt.step()
        if cfg.ref_refresh and (step + 1) % cfg.ref_refresh == 0:
            ref.module.load_state_dict(policy.module.state_dict())
        log["steps"].append({"step": step + 1, "reward": float(rewards.mean()), "loss": total_loss,
                             "accuracy": float(sum(r == 1.0 for r in rewards.tolist()) / len(rewards)),
                             "sample_s": t_sample, "update_s": time.perf_counter() - t0 - t_sample})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save(step + 1)
    policy.module.eval()
    log["after"] = evaluate(policy, task, cfg.eval_n, cfg)
    atomic_write_json(out / "log.json", log)
    write_curves(out, log)
    return log


def write_curves(out: Path, log: dict) -> Path:
    import plotly.graph_objects as go

    steps = [s["step"] for s in log["steps"]]
    fig = go.Figure()
    for key in ("reward", "accuracy"):
        fig.add_trace(go.Scatter(x=steps, y=[s[key] for s in log["steps"]], name=f"rollout {key}"))
    fig.update_layout(title=f"{log['config']['algo']} on {log['config']['task']}", xaxis_title="step")
    return atomic_write_text(out / "curves.html", fig.to_html(include_plotlyjs=True))
