"""RL post-training of a masked diffusion LM on a verifiable task: `dlmscope rspo`.

A step samples `prompts_per_step` train prompts, `group_size` completions each (our sampler, temperature
> 0), scores them with the task and takes `inner_iters` optimiser steps on RSPO's, diffu-GRPO's or SPG's
loss (RSPO and diffu-GRPO against a frozen, optionally refreshed, reference). `RLRun` holds one run's
state and its steps (setup, step, evaluate, checkpoint, finish); `train_rl` drives it.

The output folder is a locked `runstate.RunFolder`: a finished or foreign folder is refused unless
`--resume`. Checkpoints are LLaDA-format folders (`load_model` reads them, tokenizer included; with LoRA
the adapters are merged and also saved in PEFT's layout under `adapter/`) plus one pickle-free,
checksummed trainer state (`runstate.save_state`: weights, optimizer, RNG, log) for `--resume`.
"""

from __future__ import annotations

import copy
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar
from pathlib import Path

import torch

from .. import checks
from ..diffusion.remasking import check_threshold
from ..diffusion.schedules import get_schedule
from ..diffusion.stepforward import check_fast_options
from ..models.kvcache import check_cache
from ..errors import DLMScopeError
from ..io_utils import atomic_write_json, atomic_write_text
from ..models.zoo import DEFAULT_MODEL
from ..io_utils import file_sha256
from ..options import Options, choices, unset
from ..runstate import Run, rng_state, set_rng_state
from ..sae.train import NonFiniteError
from . import lora
from .losses import (SPG_ESTIMATES, elbo_draws, elbo_logp, grpo_loss, one_step_input, rspo_loss, spg_logp,
                     spg_loss, spg_masks, token_logp)
from .rollout import Rollout, evaluate, sample_groups

ALGORITHMS = ("rspo", "diffu-grpo", "spg")
STATE = "trainer_state"


def _tasks() -> tuple[str, ...]:
    from ..tasks import TASKS

    return tuple(TASKS)


@dataclass
class RLConfig(Options):
    """An RL run; every field is a `dlmscope rspo` flag and a config-file key."""

    renamed: ClassVar[dict[str, str]] = {"steps": "rl_steps", "schedule": "sampler_schedule", "cache": "kv_cache"}

    model: str = DEFAULT_MODEL
    """Model to train: a built-in name or a LLaDA-format checkpoint folder."""
    ref: str | None = field(default=None, metadata=unset("a frozen copy of --model"))
    """Reference checkpoint for rspo/diffu-grpo; same architecture and tokenizer."""
    algo: str = field(default="rspo", metadata=choices(lambda: ALGORITHMS))
    """RL algorithm: rspo, diffu-grpo or spg."""
    task: str = field(default="sudoku", metadata=choices(_tasks))
    """Verifiable task."""
    min_empty: int = 10
    """Sudoku: fewest empty cells (the tiny DLM solves easier puzzles already)."""
    max_empty: int = 12
    """Sudoku: most empty cells (12 is the most a uniquely solvable 4x4 puzzle allows)."""
    rl_steps: int = 30
    """RL rollout steps (each takes inner_iters optimiser steps)."""
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
    """Mask draws per completion: RSPO's ELBO draws (shared by policy and reference), SPG's num_t."""
    normalise_adv: bool = False
    """Divide advantages by the group's reward std (GRPO style); off keeps RSPO's target in reward units."""
    clip: float = 0.2
    """diffu-GRPO ratio clip epsilon."""
    beta: float = 0.04
    """diffu-GRPO k3-KL coefficient."""
    prompt_mask_p: float = 0.15
    """diffu-GRPO and SPG: probability of masking each prompt token (SPG: each token before the masked block)."""
    spg_estimate: str = field(default="eubo", metadata=choices(lambda: SPG_ESTIMATES))
    """SPG bound for completions with advantage <= 0: eubo, mix (w EUBO + (1-w) ELBO) or elbo."""
    spg_beta: float = 1.0
    """SPG EUBO beta > 0 (published: 1.0 Sudoku, 1.5 GSM8K/MATH/Countdown)."""
    spg_mix_weight: float = 0.5
    """SPG mix weight w in [0, 1] (only with --spg-estimate mix)."""
    spg_block_length: int = 8
    """SPG block length of the block-wise random masks; gen_length / it must be >= mc_draws."""
    lora_r: int = 0
    """LoRA rank (0: train every weight); adapters via the peft library."""
    lora_alpha: float = 16.0
    """LoRA alpha (scale alpha / r; d1 uses r 128, alpha 64)."""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    """Comma-separated module names LoRA wraps (Llama names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)."""
    temperature: float = 1.0
    """Rollout sampling temperature (> 0, or groups collapse to one completion)."""
    gen_length: int = 16
    """Tokens to generate per completion (one block)."""
    denoise_steps: int = 16
    """Denoising steps per rollout and evaluation."""
    sampler_schedule: str | None = field(default=None, metadata=unset("the model family's own"))
    """Sampler schedule of rollouts and evaluation: linear or dream."""
    threshold: float | None = field(default=None, metadata=unset("off"))
    """Fast-dLLM parallel decoding for rollouts and evaluation: reveal every masked position with confidence >=
    this (0 < t <= 1)."""
    kv_cache: str | None = field(default=None, metadata=unset("off"))
    """Fast-dLLM block KV cache for rollouts and evaluation: prefix or dual."""
    ref_refresh: int = 0
    """Copy the policy into the reference every N rollout steps (0 = frozen)."""
    eval_split: str = field(default="test", metadata=choices(lambda: ("test", "validation")))
    """Split evaluated greedily: test, or validation to tune a run without reading the test examples."""
    eval_n: int = 50
    """Examples of --eval-split evaluated greedily."""
    eval_every: int = 0
    """Evaluate every N rollout steps (0 = only before and after training)."""
    checkpoint_every: int = 10
    """Rollout steps between checkpoints (the last step is always saved)."""
    out: str = "runs/rl"
    """Output folder (checkpoint-NNNNN/, trainer_state.*, log.json, curves.html); must be new or empty unless --resume."""
    resume: bool = False
    """Continue from the folder's trainer state."""
    seed: int = 0
    """Seed for prompts, rollouts and masks."""
    device: str = "cpu"
    """Torch device."""

    def check(self) -> None:
        check_config(self)


# options that only one algorithm reads: setting them for another is a mistake worth one line
_OPTION_ALGOS = {"ref": ("rspo", "diffu-grpo"), "ref_refresh": ("rspo", "diffu-grpo"), "lam": ("rspo",),
                 "clip": ("diffu-grpo",), "beta": ("diffu-grpo",), "mc_draws": ("rspo", "spg"),
                 "prompt_mask_p": ("diffu-grpo", "spg"), "spg_estimate": ("spg",), "spg_beta": ("spg",),
                 "spg_mix_weight": ("spg",), "spg_block_length": ("spg",)}
_POSITIVE_INTS = ("rl_steps", "prompts_per_step", "inner_iters", "grad_accum", "mc_draws", "gen_length", "denoise_steps",
                  "checkpoint_every", "eval_n", "spg_block_length")
_FLOAT_RANGES = {  # name -> (low, high, low_open, high_open) for checks.number
    "lr": (0, None, True, False), "lam": (0, None, True, False), "temperature": (0, None, True, False),
    "spg_beta": (0, None, True, False), "lora_alpha": (0, None, True, False), "clip": (0, 1, True, True),
    "prompt_mask_p": (0, 1, False, True), "beta": (0, None, False, False), "spg_mix_weight": (0, 1, False, False)}


def check_config(cfg: RLConfig) -> None:
    """One-line errors for values the run cannot use, before anything is loaded or written (`RLConfig` runs it
    when built)."""
    defaults = {f.name: f.default for f in fields(RLConfig)}
    for name, algos in _OPTION_ALGOS.items():
        if cfg.algo not in algos and getattr(cfg, name) != defaults[name]:
            raise DLMScopeError(f"--{name.replace('_', '-')} is an option of {' and '.join(algos)}, not of {cfg.algo}")
    for name, bounds in _FLOAT_RANGES.items():
        checks.number(name, getattr(cfg, name), *bounds)
    for name in _POSITIVE_INTS:
        checks.positive(name, getattr(cfg, name))
    if cfg.sampler_schedule is not None:
        get_schedule(cfg.sampler_schedule)
    for name in ("lora_r", "ref_refresh", "eval_every"):
        checks.non_negative(name, getattr(cfg, name))
    checks.seed("seed", cfg.seed)
    checks.integer("min_empty", cfg.min_empty, 1, 12)  # a 4x4 Sudoku has 16 cells; at most 12 empty
    checks.integer("max_empty", cfg.max_empty, cfg.min_empty, 12)
    if cfg.group_size < 2:
        raise DLMScopeError(f"group_size={cfg.group_size}: group advantages need at least 2 completions per prompt")
    if cfg.prompts_per_step % cfg.grad_accum:
        raise DLMScopeError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by grad_accum={cfg.grad_accum}")
    if cfg.algo == "spg" and (cfg.gen_length % cfg.spg_block_length or cfg.gen_length // cfg.spg_block_length < cfg.mc_draws):
        raise DLMScopeError(f"spg_block_length={cfg.spg_block_length} must divide gen_length={cfg.gen_length} into at "
                            f"least mc_draws={cfg.mc_draws} blocks")
    check_threshold(cfg.threshold)
    check_cache(None, cfg.kv_cache)


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


def _spg_update(policy, ref, roll: Rollout, opt, cfg: RLConfig, gen: torch.Generator) -> dict:
    """SPG: ELBO for A > 0, the upper bound otherwise, from `mc_draws` block-random masks per iteration."""
    slices = _micro_batches(roll.seqs.shape[0], cfg.grad_accum)
    lengths = roll.completion.sum(1)
    positive = roll.advantages.to(lengths.device) > 0
    losses, bound = [], []
    for _ in range(cfg.inner_iters):
        xt = spg_masks(roll.seqs, cfg.gen_length, policy.mask_id, cfg.mc_draws, cfg.spg_block_length,
                       cfg.prompt_mask_p, gen)
        opt.zero_grad(set_to_none=True)
        total, est = 0.0, []
        for sl in slices:
            logp = torch.stack([token_logp(policy, xt[sl, t], roll.seqs[sl], roll.attn[sl]) for t in range(cfg.mc_draws)], 1)
            lp = spg_logp(logp, xt[sl] == policy.mask_id, roll.completion[sl], positive[sl], cfg.spg_beta,
                          cfg.spg_estimate, cfg.spg_mix_weight)
            loss = spg_loss(lp, roll.advantages[sl].to(lp.device), lengths[sl], float(lengths.sum()))
            loss.backward()
            total += float(loss.detach())
            est.append(lp.detach())
        _step(policy, opt)
        losses.append(total)
        bound.append(float(torch.cat(est).mean()))
    return {"loss": sum(losses) / len(losses), "logp_bound": bound[0]}


UPDATES = {"rspo": _rspo_update, "diffu-grpo": _grpo_update, "spg": _spg_update}


def _micro_batches(n: int, k: int) -> list[slice]:
    per = n // k
    return [slice(i, i + per) for i in range(0, n, per)]


def _step(policy, opt) -> None:
    """Clip to norm 1 and step; a NaN / inf gradient (from a non-finite loss) stops before the weights change."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in policy.module.parameters() if p.requires_grad], 1.0)
    if not bool(norm.isfinite()):
        raise NonFiniteError(f"the policy's gradient norm is {float(norm)} (a NaN/inf loss or gradient)")
    opt.step()


class RLRun(Run):
    """One RL run: `setup()` once, `step(i)` per rollout step (it evaluates and checkpoints on schedule), `finish()`.

    The lifecycle is `runstate.Run`'s (lock, signals, checksummed state, resume checks, progress); `run()` does
    all of it: inside the locked folder, a SIGINT/SIGTERM finishes the step, checkpoints and stops.
    """

    state_name = STATE
    resumable = ("resume", "device", "rl_steps", "checkpoint_every", "eval_every")
    """Options a --resume may change: continuing for more steps is how a run is extended."""

    def __init__(self, cfg: RLConfig, task=None):
        super().__init__(cfg, cfg.out)
        self.task = task if task is not None else make_task(cfg)
        self.start = 0

    def setup(self) -> None:
        """Load policy (LoRA-wrapped if asked) and reference, the optimiser and prompts; restore state on --resume."""
        from ..analysis.stability import check_compatible
        from ..models import load_model
        from ..models.verify import peek_family

        cfg = self.cfg
        saved = None
        if cfg.resume:  # before any model loads
            saved = self.load()
            self.check_resume(saved["log"]["config"])
        if peek_family(cfg.model) != "llada":  # before anything loads
            raise DLMScopeError(f"RL writes LLaDA-format checkpoints; {cfg.model} is a {peek_family(cfg.model)} model")
        torch.manual_seed(cfg.seed)  # LoRA's initialisation
        self.policy = load_model(cfg.model, device=cfg.device)
        if self.policy.family != "llada":
            raise DLMScopeError(f"RL writes LLaDA-format checkpoints; {self.policy.name} is a {self.policy.family} model")
        self.policy.require_mask_id()
        self.fast = {"threshold": cfg.threshold, "cache": cfg.kv_cache}
        check_fast_options(self.policy, **self.fast)
        self.ref = None
        if cfg.algo != "spg":  # SPG has no reference; the reference never carries adapters
            self.ref = load_model(cfg.ref, device=cfg.device) if cfg.ref else copy.deepcopy(self.policy)
            if cfg.ref:
                check_compatible(self.policy, self.ref)
            self.ref.module.eval().requires_grad_(False)
        if cfg.lora_r:
            lora.add_adapters(self.policy.module, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
        self.opt = torch.optim.AdamW([p for p in self.policy.module.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=0.0)
        self.rng = random.Random(cfg.seed)
        self.eval_examples = self.task.examples(cfg.eval_split, cfg.eval_n, seed=0)
        self.pool = self.task.examples("train", 2000, seed=cfg.seed)
        if saved is not None:
            self._restore(saved)
            self._repair_checkpoint()
        else:
            self.log: dict[str, Any] = {"config": asdict(cfg), "steps": [], "eval": []}
            self.log["before"] = self.evaluate(0)

    def _weights(self, lm) -> dict:
        """What the state keeps of a model: the trainable tensors under LoRA (the base is --model), else all."""
        return lora.adapter_state(lm.module) if self.cfg.lora_r else lm.module.state_dict()

    def _state(self, step: int) -> dict:
        state = {"step": step, "policy": self._weights(self.policy), "opt": self.opt.state_dict(), "log": self.log,
                 "rng": {"run": self.rng.getstate(), "global": rng_state()}}
        if self.ref is not None and self.cfg.ref_refresh:  # a frozen reference is --ref / --model itself
            state["ref"] = self.ref.module.state_dict()
        return state

    def _restore(self, state: dict) -> None:
        try:
            lora.load_weights(self.policy.module, state["policy"], partial=bool(self.cfg.lora_r))
            if "ref" in state and self.ref is not None:
                self.ref.module.load_state_dict(state["ref"])
            self.opt.load_state_dict(state["opt"])
        except (RuntimeError, KeyError, ValueError):
            raise DLMScopeError(f"trainer state in {str(self.folder)!r} was written for another model or options than "
                                f"{self.cfg.model!r} (lora_r={self.cfg.lora_r})") from None
        self.log, self.start = state["log"], state["step"]
        self.rng.setstate(state["rng"]["run"])
        set_rng_state(state["rng"]["global"])

    def _repair_checkpoint(self) -> None:
        """On resume: the checkpoint written with the restored state must match the checksum recorded with it;
        a damaged one (a kill mid-copy, a truncated file) is rewritten from the state, and said so in one line."""
        recorded = self.log.get("checkpoints", {})
        name = f"checkpoint-{self.start:05d}"
        file = self.folder / name / "model.safetensors"
        if name in recorded and (not file.is_file() or file_sha256(file) != recorded[name]):
            self.checkpoint(self.start)
            print(f"repaired {str(file)!r}: it did not match its recorded checksum; rewritten from the trainer state",
                  file=sys.stderr)
        for other in sorted(set(recorded) - {name}):  # earlier checkpoints: their weights are not kept to repair
            path = self.folder / other / "model.safetensors"
            if not path.is_file() or file_sha256(path) != recorded[other]:
                print(f"warning: {str(path)!r} does not match its recorded checksum (damaged; it cannot be rewritten)",
                      file=sys.stderr)

    def evaluate(self, step: int) -> dict:
        """Greedy exact accuracy and mean reward on the fixed --eval-split examples, appended to the log."""
        self.policy.module.eval()
        r = {"step": step, **evaluate(self.policy, self.task, self.eval_examples, gen_length=self.cfg.gen_length,
                                      steps=self.cfg.denoise_steps, schedule=self.cfg.sampler_schedule,
                                      **self.fast)}
        self.log["eval"].append(r)
        return r

    def step(self, step: int) -> dict:
        """Rollout step `step` (0-based): sample, update, log; evaluate and checkpoint when due."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.policy.module.eval()
        roll = sample_groups(self.policy, self.task, self.rng.sample(self.pool, cfg.prompts_per_step), cfg.group_size,
                             gen_length=cfg.gen_length, steps=cfg.denoise_steps, temperature=cfg.temperature,
                             seed=self.rng.randrange(2**31), normalise=cfg.normalise_adv, schedule=cfg.sampler_schedule,
                             **self.fast)
        t1 = time.perf_counter()
        self.policy.module.train()
        try:
            stats = UPDATES[cfg.algo](self.policy, self.ref, roll, self.opt, cfg,
                                      torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
        except NonFiniteError as e:
            raise DLMScopeError(f"training stopped at rollout step {step + 1}: {e} (lr={cfg.lr:g}, {cfg.algo}); "
                                f"{self.kept()}") from None
        if self.ref is not None and cfg.ref_refresh and (step + 1) % cfg.ref_refresh == 0:
            self.ref.module.load_state_dict(lora.plain_state(self.policy.module, bool(cfg.lora_r)))
        flat = roll.rewards.view(-1, cfg.group_size)
        row = {"step": step + 1, "reward": float(roll.rewards.mean()), "accuracy": float(roll.correct.float().mean()),
               "constant_groups": float((flat.max(1).values == flat.min(1).values).float().mean()),
               **stats, "sample_s": t1 - t0, "update_s": time.perf_counter() - t1}
        self.log["steps"].append(row)
        done = step + 1 == cfg.rl_steps
        if done:
            self.log["after"] = self.evaluate(step + 1)
        elif cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            self.evaluate(step + 1)
        if done or (step + 1) % cfg.checkpoint_every == 0:
            self.checkpoint(step + 1)
        return row

    def checkpoint(self, step: int) -> Path:
        """checkpoint-NNNNN/ (merged LLaDA folder, `adapter/` under LoRA), then the trainer state, log and curves."""
        from ..models.llada import save_llada

        folder = self.folder / f"checkpoint-{step:05d}"
        p, cfg = self.policy, self.cfg
        save_llada(lora.merged(p.module) if cfg.lora_r else p.module, folder, mask_id=p.require_mask_id(),
                   tokenizer=p.tokenizer)
        self.log.setdefault("checkpoints", {})[folder.name] = file_sha256(folder / "model.safetensors")
        if cfg.lora_r:
            lora.save_adapter(p.module, folder / "adapter", cfg.lora_r, cfg.lora_alpha, cfg.lora_targets, cfg.model)
        self.save(self._state(step))
        self._write_log()
        return folder

    def _write_log(self) -> None:
        atomic_write_json(self.folder / "log.json", self.log)
        write_curves(self.folder, self.log)

    def finish(self) -> dict:
        """The log (also in `out/log.json`); a resumed finished run reports its last evaluation."""
        self.policy.module.eval()
        if "after" not in self.log:
            self.log["after"] = self.log["eval"][-1]
        self._write_log()
        return self.log


    def run(self) -> dict:
        """The whole run in the locked folder; the log, or on SIGINT/SIGTERM the log so far with `interrupted`
        and `signal` set (the state is checkpointed: continue with --resume)."""
        cfg = self.cfg
        with self.lock():
            self.setup()
            with self.signals():
                for step in self.progress(range(self.start, cfg.rl_steps), initial=self.start, total=cfg.rl_steps,
                                          desc=f"{cfg.algo} on {getattr(self.task, 'name', 'task')}"):
                    self.step(step)
                    if self.stop_requested() and step + 1 < cfg.rl_steps:
                        if (step + 1) % cfg.checkpoint_every:
                            self.checkpoint(step + 1)
                        print(f"interrupted at step {step + 1}/{cfg.rl_steps}; checkpoint written, continue with "
                              "--resume")
                        return {**self.log, "interrupted": True, "signal": self.signal}
            return self.finish()


def train_rl(cfg: RLConfig, task=None) -> dict:
    """Run RSPO, diffu-GRPO or SPG; returns the log (also in `out/log.json`). `task` overrides `cfg.task`."""
    return RLRun(cfg, task).run()


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

