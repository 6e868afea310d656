"""Model diffing of dlmscope-tiny-dlm across post-training: crosscoders with Latent Scaling, next to SAE matching.

Checkpoints (all read at layer 1, residual stream, every position of rows corrupted with DLM-Scope masking):
- base: dlmscope-tiny-dlm;
- rspo: `dlmscope rspo --algo rspo --task sudoku --steps 30 --out runs/rl-rspo` (its last checkpoint);
- countdown (positive control): the base fine-tuned hard on Countdown problems only with the masked-diffusion
  ELBO (`finetune_countdown` below);
- base vs base (negative control): identical weights give identical activations, so the pair is the base's
  activations twice.
One paired activation stream [base, rspo, countdown] (`CrossCoderRun`: every checkpoint on the identical
corrupted batch) trains, side by side: BatchTopK crosscoders (expansion 4, k=32) for each pair with seeds
0, 1, 2, and Top-K SAEs (k=32, same width) on base (seeds 0 and 1), rspo (seed 2) and countdown (seed 3),
whose Hungarian-matched decoder cosines are recorded as training proceeds (matched cosine vs tokens).
Text: the built-in corpus plus the task corpus (Countdown and Sudoku documents), shuffled, so held-out text
contains the fine-tuned kinds of text. Writes experiments/results/diff_rspo.{json,md} and diff_rspo_summary.json
(every number of the crosscoder table).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402
from dlmscope.io_utils import atomic_write_json, atomic_write_text  # noqa: E402

PAIRS = {"base_vs_base": (0, 0), "base_vs_rspo": (0, 1), "base_vs_countdown": (0, 2)}
SAES = {"base_s0": (0, 0), "base_s1": (0, 1), "rspo_s2": (1, 2), "countdown_s3": (2, 3)}
CC_SEEDS = (0, 1, 2)


def finetune_countdown(out: Path, steps: int, lr: float, batch: int = 16, seed: int = 0) -> Path:
    """The base fine-tuned on Countdown problems (prompt + answer) with the masked-diffusion ELBO; saved as LLaDA."""
    import torch

    from dlmscope.data import pack
    from dlmscope.diffusion.loss import diffusion_lm_loss
    from dlmscope.diffusion.noise import corrupt, sample_t
    from dlmscope.models import load_model
    from dlmscope.models.llada import save_llada
    from dlmscope.tasks import get_task

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    lm = load_model("dlmscope-tiny-dlm")
    texts = [ex.prompt + ex.answer for ex in get_task("countdown").examples("train", 2000, seed)]
    rows = pack(lm.tokenizer, texts, 64).input_ids
    opt = torch.optim.AdamW(lm.module.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    lm.module.train()
    for _ in range(steps):
        x0 = rows[torch.randint(rows.shape[0], (batch,), generator=gen)]
        loss = diffusion_lm_loss(lm, x0, corrupt(x0, lm.mask_id, sample_t(batch, generator=gen), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.module.eval()
    save_llada(lm.module, out, mask_id=lm.mask_id, tokenizer=lm.tokenizer)
    return out


def _study_run_class():
    import torch
    from types import SimpleNamespace

    from dlmscope.analysis.stability import matched_similarity
    from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig, save_sae
    from dlmscope.sae.crosscoder import CrossCoderConfig, CrossCoderTrainer, save_crosscoder
    from dlmscope.training import CrossCoderRun

    class StudyRun(CrossCoderRun):
        """Pairwise crosscoders and per-checkpoint SAEs, all fed from one paired stream (slices of it)."""

        pairs, saes = PAIRS, SAES

        def build_trainers(self, d_in: int, meta: dict) -> None:
            cfg, h = self.cfg, self.hooks[0]
            d = next(iter(self.eval_set.values())).shape[1] // len(self.checkpoints)
            self.d, self.slices, self.matching = d, {}, []
            tcfg = lambda seed: TrainConfig(total_tokens=cfg.total_tokens, batch_size=cfg.batch_size, lr=cfg.lr,  # noqa: E731
                                            seed=seed)
            for pair, (a, b) in self.pairs.items():
                for s in CC_SEEDS:
                    key = f"cc-{pair}-s{s}"
                    names = [self.checkpoints[a], self.checkpoints[b] + ("-copy" if a == b else "")]
                    self.trainers[key] = CrossCoderTrainer(CrossCoderConfig(d, cfg.expansion * d, 32, names,
                                                                            {**meta, "hook_name": h}), tcfg(s))
                    self.slices[key], self.routes[key] = (a, b), h
            for name, (c, s) in self.saes.items():
                key = f"sae-{name}"
                self.trainers[key] = SAETrainer(SAEConfig(d, cfg.expansion * d, 32, "topk", {**meta, "hook_name": h}),
                                                tcfg(s))
                self.slices[key], self.routes[key] = (c,), h

        def inputs(self, key: str, acts: dict[str, torch.Tensor]) -> torch.Tensor:
            x, d = acts[self.routes[key]], self.d
            return torch.cat([x[:, i * d:(i + 1) * d] for i in self.slices[key]], dim=1)

        def evaluate(self, logs: dict) -> None:
            super().evaluate(logs)
            saes = [self.trainers[f"sae-{n}"].sae for n in SAES]
            noise = torch.randn(saes[0].W_dec.shape, generator=torch.Generator().manual_seed(12345))
            entry = {"tokens": self.steps_done * self.cfg.batch_size}
            for name, other in zip(("base_other_seed", "rspo", "countdown", "random"),
                                   (saes[1], saes[2], saes[3], SimpleNamespace(W_dec=noise))):
                m = matched_similarity([saes[0], other])[0]
                entry[name] = {k: m[k] for k in ("mean", "median", "p10", "fraction_above_0.9")}
            self.history[-1]["matching"] = entry

        def save_output(self, key: str, trainer, density: torch.Tensor) -> Path:
            if key.startswith("cc-"):
                return save_crosscoder(trainer.sae, self.folder / "crosscoders" / key, density=density)
            return save_sae(trainer.sae, self.folder / "saes" / key, density=density)

    return StudyRun


def _mixed_text(path: Path) -> Path:
    from dlmscope.data import load_texts
    from dlmscope.tasks import task_corpus

    if not path.is_file():
        docs = load_texts("builtin", "train") + load_texts("builtin", "heldout") + task_corpus(600, seed=1)
        random.Random(0).shuffle(docs)
        atomic_write_text(path, "\n\n".join(d.replace("\n\n", "\n") for d in docs) + "\n")
    return path


def _is_task_text(text: str) -> str | None:
    return "countdown" if "Countdown:" in text or "Equation:" in text else "sudoku" if "Sudoku" in text else None


def run(args) -> dict:
    import torch

    from dlmscope.analysis.diffing import crosscoder_report, paired_text, PairedText
    from dlmscope.data import load_texts, pack
    from dlmscope.models import load_model
    from dlmscope.sae.crosscoder import load_crosscoder
    from dlmscope.training import TrainSAEConfig, split_texts

    torch.set_num_threads(1)
    work = ROOT / "runs"
    rspo = args.rspo
    if not (rspo / "config.json").is_file():
        raise SystemExit(f"missing RSPO checkpoint {rspo}; run: dlmscope rspo --algo rspo --task sudoku --steps 30 "
                         "--out runs/rl-rspo")
    countdown = finetune_countdown(work / f"countdown-ft-{args.ft_steps}-lr{args.ft_lr:g}", args.ft_steps, args.ft_lr)
    data = _mixed_text(work / "diff_mixed.txt")
    ckpts = ["dlmscope-tiny-dlm", str(rspo), str(countdown)]
    cfg = TrainSAEConfig(model=ckpts[0], layers="1", total_tokens=args.total_tokens, dataset=str(data), out=str(work),
                         name=f"diff-study-{args.total_tokens}-ft{args.ft_lr:g}", eval_every=100, checkpoint_every=100, progress=False, seed=0,
                         batch_size=256, lr=args.lr,
                         policy="all", expansion=args.expansion,
                         resume=(work / f"diff-study-{args.total_tokens}-ft{args.ft_lr:g}" / "checkpoint.json").is_file())
    study = _study_run_class()(cfg, ckpts)
    result = study.run()
    lms = [load_model(c) for c in ckpts]
    _, heldout = split_texts(str(data), "text")
    packed = pack(lms[0].tokenizer, heldout, 128)
    rows, owners = packed.input_ids[:args.n_seqs], packed.doc_ids[:args.n_seqs]
    text = paired_text(lms, "blocks.1.hook_resid_post", rows, seed=2)
    d = lms[0].d_model
    res = {"config": {"checkpoints": ckpts, "total_tokens": args.total_tokens, "ft_steps": args.ft_steps, "ft_lr": args.ft_lr,
                      "n_seqs": args.n_seqs, "lr": args.lr, "batch_size": 256, "n_latents": args.expansion * d, "policy": "all", "hook": "blocks.1.hook_resid_post", "threshold": 0.9, "nu_max": 0.3},
           "crosscoders": {}, "matching_vs_tokens": [h["matching"] for h in result.history if "matching" in h],
           "sae_final": {k: {m: v[m] for m in ("fvu", "l0", "dead_fraction")} for k, v in result.metrics.items()}}
    for key, folder in result.saes.items():
        if not key.startswith("cc-"):
            continue
        a, b = study.slices[key]
        pair = PairedText(text.x0, text.xt, text.masked,
                          torch.cat([text.acts[:, a * d:(a + 1) * d], text.acts[:, b * d:(b + 1) * d]], 1))
        r = crosscoder_report(load_crosscoder(folder), pair, lms[0], n_examples=5)
        e = r["per_checkpoint"][0]
        for side in ("later", "base"):  # which held-out document each top example comes from
            for lat in e[f"specific_{side}"]["latents"]:
                for ex in lat["examples"]:
                    ex["doc_kind"] = _is_task_text(heldout[int(owners[ex["row"], ex["position"]])]) or "prose"
        res["crosscoders"][key] = {m: r[m] for m in ("fvu", "l0", "n_alive")} | {"per_checkpoint": r["per_checkpoint"]}
    return res


def _mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and t-based 95% interval over seeds (n = 3: t = 4.303)."""
    import statistics

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, m, m
    t = {2: 12.706, 3: 4.303, 4: 3.182}.get(len(values), 2.0)
    half = t * statistics.stdev(values) / len(values) ** 0.5
    return m, m - half, m + half


def render(res: dict, out: Path) -> str:
    lines = ["| pair | FVU | alive | relative norm p1 / p99 | min / max | decoder cosine (median, shared) | "
             "specific to later: count | robust (Latent Scaling) | specific to base: count | robust | "
             "top examples of later-specific latents in task text |", "|" + "---|" * 11]
    summary = {}
    for pair in PAIRS:
        keys = [k for k in res["crosscoders"] if k.startswith(f"cc-{pair}-")]
        rs = [res["crosscoders"][k] for k in keys]
        es = [r["per_checkpoint"][0] for r in rs]
        col = lambda f: _mean_ci([f(e) for e in es])  # noqa: E731
        later, robust = col(lambda e: e["specific_later"]["count"]), col(lambda e: e["specific_later"]["robust"])
        base, base_r = col(lambda e: e["specific_base"]["count"]), col(lambda e: e["specific_base"]["robust"])
        kinds = [ex["doc_kind"] for e in es for lat in e["specific_later"]["latents"] for ex in lat["examples"]]
        task = sum(k != "prose" for k in kinds)
        fmt = lambda c: f"{c[0]:.1f} [{c[1]:.1f}, {c[2]:.1f}]"  # noqa: E731
        fvu = _mean_ci([r["fvu"] for r in rs])
        rel = [sorted(e["relative_norm"]) for e in es]
        pct = lambda q: _mean_ci([v[min(len(v) - 1, int(q * len(v)))] for v in rel])[0]  # noqa: E731
        p1, p99, lo, hi = pct(0.01), pct(0.99), min(v[0] for v in rel), max(v[-1] for v in rel)
        spread = f"{p1:.3f} / {p99:.3f} | {lo:.3f} / {hi:.3f}"
        cos = _mean_ci([e["cosine_shared_median"] for e in es])
        lines.append(f"| {pair} | {fvu[0]:.3f} | {_mean_ci([r['n_alive'] for r in rs])[0]:.0f} | {spread} | "
                     f"{cos[0]:.3f} [{cos[1]:.3f}, {cos[2]:.3f}] | {fmt(later)} | "
                     f"{fmt(robust)} | {fmt(base)} | {fmt(base_r)} | {task}/{len(kinds)} |")
        summary[pair] = {"fvu": fvu, "relative_norm_p1_p99": [p1, p99], "relative_norm_min_max": [lo, hi],
                         "cosine_shared_median": cos, "later": later, "robust": robust, "base": base,
                         "base_robust": base_r, "task_examples": [task, len(kinds)]}
    m_lines = ["| tokens | base other seed | RSPO SAE | Countdown-FT SAE | random directions |", "|---|---|---|---|---|"]
    for m in res["matching_vs_tokens"]:
        m_lines.append(f"| {m['tokens']:,} | " + " | ".join(f"{m[k]['mean']:.3f} ({m[k]['fraction_above_0.9']:.2f} > 0.9)"
                                                          for k in ("base_other_seed", "rspo", "countdown", "random")) + " |")
    c = res["config"]
    md = (f"Crosscoders (BatchTopK, {c['n_latents']} latents, k=32, {c['total_tokens']:,} tokens, seeds 0-2) at "
          f"{c['hook']}; a latent is specific to the later checkpoint when its relative decoder norm exceeds "
          f"{c['threshold']} (to the base: below {1 - c['threshold']:.1f}); robust when both Latent Scaling ratios "
          f"are below {c['nu_max']}. Counts and cosine: mean over 3 seeds [95% t-interval]; relative-norm "
          f"percentiles over alive latents, mean over seeds; min / max over all seeds. Last column: of the top held-out "
          f"examples of the later-specific latents (all seeds), how many lie in Countdown/Sudoku documents. "
          f"Activations at all positions of the corrupted rows (t ~ U[0.05, 0.5]). "
          f"Held-out: {c['n_seqs']} rows of the shuffled builtin + task text.\n\n" + "\n".join(lines) +
          "\n\nSAE lens: mean Hungarian-matched decoder cosine against the base SAE (seed 0), fraction above 0.9, as "
          f"training proceeds (Top-K, k=32, {c['n_latents']} latents, same tokens):\n\n" + "\n".join(m_lines) + "\n")
    atomic_write_json(out / "diff_rspo_summary.json", summary)
    atomic_write_text(out / "diff_rspo.md", md)
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rspo", type=Path, default=ROOT / "runs" / "rl-rspo" / "checkpoint-00030")
    p.add_argument("--total-tokens", type=int, default=100_000)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--ft-steps", type=int, default=120)
    p.add_argument("--ft-lr", type=float, default=5e-4, help="Countdown fine-tune learning rate (AdamW)")
    p.add_argument("--lr", type=float, default=3e-3, help="crosscoder and SAE learning rate (short runs need a high one)")
    p.add_argument("--n-seqs", type=int, default=48)
    run_or_render(p, "diff_rspo", run, render)


if __name__ == "__main__":
    main()
