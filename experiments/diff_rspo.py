"""Model diffing of dlmscope-tiny-dlm across post-training: crosscoders with Latent Scaling.

Checkpoints (all read at layer 1, residual stream, every position -- masked and visible -- of rows corrupted
with DLM-Scope masking):
- base: dlmscope-tiny-dlm;
- rspo: `dlmscope rspo --algo rspo --task sudoku --steps 30 --out runs/rl-rspo` (its last checkpoint);
- spg, diffu_grpo (the other RL methods, same settings): `--algo spg ... --out runs/rl-spg` and
  `--algo diffu-grpo ... --out runs/rl-diffu-grpo` (pairs base_vs_spg, base_vs_diffu_grpo; not in the default
  `--pairs`, run them with `--pairs base_vs_spg,base_vs_diffu_grpo --name diff_rl_methods`);
- countdown (positive control): the base fine-tuned hard on Countdown problems only with the masked-diffusion
  ELBO (`finetune_countdown` below), or narrowly: only some weights (--ft-params), with a penalty on the change
  of the diffed activations on other text (--ft-preserve, --ft-preserve-on);
- base vs base (negative control): identical weights give identical activations, so the pair is the base's
  activations twice.
One paired activation stream of the checkpoints the pairs need (`CrossCoderRun`: every checkpoint on the identical
corrupted batch) trains BatchTopK crosscoders (expansion 4, k=32) for each pair with seeds 0, 1, 2.
Text (`mixed_text`): the built-in corpus plus Countdown and Sudoku documents making up `--task-share` of its
tokens (half each), shuffled, so training and held-out text contain the fine-tuned kinds of text.
Rule, one for every pair, fixed before the runs: a latent is specific to the later checkpoint when its
relative decoder norm |d_later| / (|d_base| + |d_later|) exceeds 0.9 (to the base: below 0.1); the
paper's rule (Minder, Dumas et al. 2025: Delta_norm = (1 + (|d_l| - |d_b|) / max(|d_l|, |d_b|)) / 2 > 0.9,
i.e. relative norm above 5/6) is reported next to it. The SAE lens is experiments/diff_sae_matching.py.
Writes experiments/results/diff_rspo.{json,md} and diff_rspo_summary.json (every number of the table).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402
from dlmscope.io_utils import atomic_write_json, atomic_write_text  # noqa: E402

CHECKPOINTS = ("base", "rspo", "countdown", "spg", "diffu_grpo")  # what PAIRS index
PAIRS = {"base_vs_base": (0, 0), "base_vs_rspo": (0, 1), "base_vs_countdown": (0, 2), "base_vs_spg": (0, 3),
         "base_vs_diffu_grpo": (0, 4)}
DEFAULT_PAIRS = ("base_vs_base", "base_vs_rspo", "base_vs_countdown")  # the study's first table
RL_ALGOS = {1: "rspo", 3: "spg", 4: "diffu-grpo"}  # checkpoint index -> `dlmscope rspo --algo`
SAES = {"base_s0": (0, 0), "base_s1": (0, 1), "rspo_s2": (1, 2), "countdown_s3": (2, 3)}
CC_SEEDS = (0, 1, 2)
PAPER_RULE = 5 / 6  # Delta_norm > 0.9 of Minder, Dumas et al. in terms of the relative norm
KINDS = ("countdown", "sudoku", "prose")  # the kinds of held-out document
LEANING_N = 10  # latents per side in the threshold-free read


HOOK = "blocks.1.hook_resid_post"


def _ft_tag(params: str, preserve: float, preserve_on: str = "prose") -> str:
    """Folder suffix of a narrow fine-tune ('' for the full, unconstrained one, so old folders keep their names)."""
    tag = "" if params == "all" else "-" + params.replace("model.layers.", "L").replace(",", "_")
    on = "" if preserve_on == "prose" else "-" + preserve_on.replace(",", "_")
    return tag + (f"-keep{preserve:g}{on}" if preserve else "")


def _hook_acts(lm, ids):
    """The diffed activations (layer 1 residual), with gradients when `lm` is being trained."""
    from dlmscope.hooks import hooked

    got = []
    with hooked(lm, {HOOK: lambda act, ctx: got.append(act)}):
        lm.forward(ids)
    return got[0].float()


def _drift(h, h_base):
    """Relative squared change of the diffed activations: sum |h - h_base|^2 / sum |h_base|^2."""
    return ((h - h_base) ** 2).sum() / (h_base ** 2).sum()


def finetune_eval(base, ft, n_rows: int = 64, seed: int = 0) -> dict:
    """Held-out ELBO loss of base and fine-tune on built-in prose and on Countdown and Sudoku test problems (the same
    corruption for both), and the relative change of the diffed activations on each (`_drift`, every position)."""
    import torch

    from dlmscope.data import load_texts, pack
    from dlmscope.diffusion.loss import diffusion_lm_loss
    from dlmscope.diffusion.noise import corrupt, sample_t
    from dlmscope.tasks import get_task

    tasks = ("countdown", "sudoku")
    texts = {"prose": load_texts("builtin", "heldout")} | {
        t: [ex.prompt + ex.answer for ex in get_task(t).examples("test", 400, seed)] for t in tasks}
    out = {}
    with torch.no_grad():
        for kind, docs in texts.items():
            x0 = pack(base.tokenizer, docs, 64).input_ids[:n_rows]
            gen = torch.Generator().manual_seed(seed)
            c = corrupt(x0, base.mask_id, sample_t(x0.shape[0], generator=gen), generator=gen)
            out[kind] = {"rows": int(x0.shape[0]), "loss_base": diffusion_lm_loss(base, x0, c).item(),
                         "loss_ft": diffusion_lm_loss(ft, x0, c).item(),
                         "drift": _drift(_hook_acts(ft, c.xt), _hook_acts(base, c.xt)).item()}
    return out


def finetune_countdown(out: Path, steps: int, lr: float, params: str = "all", preserve: float = 0.0,
                       preserve_on: str = "prose", batch: int = 16, seed: int = 0) -> Path:
    """The base fine-tuned on Countdown problems (prompt + answer) with the masked-diffusion ELBO; saved as LLaDA,
    with the mean training loss of its first and last 10 steps and `finetune_eval` in finetune.json.

    `params`: "all", or comma-separated parameter-name prefixes, the only weights trained (a narrow change).
    `preserve`: weight of a preservation term, `_drift` of the diffed activations on corrupted built-in prose
    (a batch like the Countdown one each step) against the frozen base, so generic text keeps its activations;
    `preserve_on` "prose,sudoku" makes half that batch Sudoku problems, the other task text of the study."""
    import torch

    from dlmscope.data import load_texts, pack
    from dlmscope.diffusion.loss import diffusion_lm_loss
    from dlmscope.diffusion.noise import corrupt, sample_t
    from dlmscope.models import load_model
    from dlmscope.models.llada import save_llada
    from dlmscope.tasks import get_task

    if (out / "config.json").is_file():
        return out
    if preserve_on not in ("prose", "prose,sudoku"):
        raise SystemExit(f"--ft-preserve-on {preserve_on!r}; allowed: prose or prose,sudoku")
    torch.manual_seed(seed)
    lm, base = load_model("dlmscope-tiny-dlm"), load_model("dlmscope-tiny-dlm")
    prefixes = None if params == "all" else tuple(params.split(","))
    trained = [p for n, p in lm.module.named_parameters() if prefixes is None or n.startswith(prefixes)]
    if not trained:
        raise SystemExit(f"--ft-params {params!r} names no parameter of dlmscope-tiny-dlm")
    for p in lm.module.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    problems = lambda task: [ex.prompt + ex.answer for ex in get_task(task).examples("pretrain", 2000, seed)]  # noqa: E731
    rows = pack(lm.tokenizer, problems("countdown"), 64).input_ids
    keep = [pack(lm.tokenizer, load_texts("builtin", "train") if on == "prose" else problems(on), 64).input_ids
            for on in preserve_on.split(",")]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    lm.module.train()
    losses, drifts = [], []
    for _ in range(steps):
        x0 = rows[torch.randint(rows.shape[0], (batch,), generator=gen)]
        loss = diffusion_lm_loss(lm, x0, corrupt(x0, lm.mask_id, sample_t(batch, generator=gen), generator=gen))
        losses.append(loss.item())
        if preserve:
            xp = torch.cat([k[torch.randint(k.shape[0], (batch // len(keep),), generator=gen)] for k in keep])
            xt = corrupt(xp, lm.mask_id, sample_t(batch, generator=gen), generator=gen).xt
            with torch.no_grad():
                h_base = _hook_acts(base, xt)
            drift = _drift(_hook_acts(lm, xt), h_base)
            drifts.append(drift.item())
            loss = loss + preserve * drift
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.module.eval()
    save_llada(lm.module, out, mask_id=lm.mask_id, tokenizer=lm.tokenizer)
    last10 = lambda v: sum(v[-10:]) / len(v[-10:])  # noqa: E731
    atomic_write_json(out / "finetune.json", {"steps": steps, "lr": lr, "batch": batch, "rows": 64, "params": params,
                                              "n_trained": sum(p.numel() for p in trained), "preserve": preserve,
                                              "preserve_on": preserve_on,
                                              "loss_first10": sum(losses[:10]) / len(losses[:10]),
                                              "loss_last10": last10(losses),
                                              "drift_last10": last10(drifts) if drifts else None,
                                              "eval": finetune_eval(base, load_model(str(out)))})
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
            cfg, h, k = self.cfg, self.hooks[0], self.cfg.k_list()[0]
            d = next(iter(self.eval_set.values())).shape[1] // len(self.checkpoints)
            self.d, self.slices, self.matching = d, {}, []
            tcfg = lambda seed: TrainConfig(total_tokens=cfg.total_tokens, batch_size=cfg.batch_size, lr=cfg.lr,  # noqa: E731
                                            seed=seed, optimizer="adam")  # the committed runs' optimiser
            for pair, (a, b) in self.pairs.items():
                for s in CC_SEEDS:
                    key = f"cc-{pair}-s{s}"
                    names = [self.checkpoints[a], self.checkpoints[b] + ("-copy" if a == b else "")]
                    self.trainers[key] = CrossCoderTrainer(CrossCoderConfig(d, cfg.expansion * d, k, names,
                                                                            {**meta, "hook_name": h}), tcfg(s))
                    self.slices[key], self.routes[key] = (a, b), h
            for name, (c, s) in self.saes.items():
                key = f"sae-{name}"
                self.trainers[key] = SAETrainer(SAEConfig(d, cfg.expansion * d, k, "topk", {**meta, "hook_name": h}),
                                                tcfg(s))
                self.slices[key], self.routes[key] = (c,), h

        def inputs(self, key: str, acts: dict[str, torch.Tensor]) -> torch.Tensor:
            x, d = acts[self.routes[key]], self.d
            return torch.cat([x[:, i * d:(i + 1) * d] for i in self.slices[key]], dim=1)

        def evaluate(self, logs: dict) -> None:
            super().evaluate(logs)
            if not self.saes:
                return
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


def mixed_text(folder: Path, task_share: float) -> Path:
    """The built-in corpus (both splits) plus Countdown and Sudoku documents (prompt + answer, half each) making
    up `task_share` of the tokens, shuffled; written once per share."""
    from dlmscope.data import load_texts
    from dlmscope.models import load_model
    from dlmscope.tasks import get_task

    path = folder / f"diff_mixed_task{task_share:g}.txt"
    if path.is_file():
        return path
    tok = load_model("dlmscope-tiny-dlm").tokenizer
    n_tokens = lambda docs: sum(len(ids) for ids in tok(docs)["input_ids"])  # noqa: E731
    prose = load_texts("builtin", "train") + load_texts("builtin", "heldout")
    want = task_share / (1 - task_share) * n_tokens(prose) / 2  # tokens per task kind
    docs = list(prose)
    for name in ("countdown", "sudoku"):
        probe = [ex.prompt + ex.answer for ex in get_task(name).examples("pretrain", 200, seed=1)]
        n = round(want / (n_tokens(probe) / len(probe)))
        docs += [ex.prompt + ex.answer for ex in get_task(name).examples("pretrain", n, seed=1)]
    random.Random(0).shuffle(docs)
    atomic_write_text(path, "\n\n".join(d.replace("\n\n", "\n") for d in docs) + "\n")
    return path


def _is_task_text(text: str) -> str | None:
    return "countdown" if "Countdown:" in text or "Equation:" in text else "sudoku" if "Sudoku" in text else None


def add_study_options(p: argparse.ArgumentParser, total_tokens: int, expansion: int, k: int) -> None:
    """Options shared with experiments/diff_sae_matching.py (same checkpoints, text and dictionary settings)."""
    for algo in RL_ALGOS.values():
        p.add_argument(f"--{algo}", type=Path, default=ROOT / "runs" / f"rl-{algo}" / "checkpoint-00030",
                       help=f"the {algo} checkpoint (dlmscope rspo --algo {algo} --task sudoku --steps 30)")
    p.add_argument("--ft-steps", type=int, default=300, help="Countdown fine-tune steps (batch 16 x 64 tokens)")
    p.add_argument("--ft-lr", type=float, default=2e-3, help="Countdown fine-tune learning rate (AdamW)")
    p.add_argument("--ft-params", default="all",
                   help="weights the Countdown fine-tune trains: all, or comma-separated parameter-name prefixes "
                        "(e.g. model.layers.0.mlp,model.layers.1.mlp)")
    p.add_argument("--ft-preserve", type=float, default=0.0,
                   help="weight of the fine-tune's preservation term: relative squared change of the diffed "
                        "activations on built-in prose against the base (0: none)")
    p.add_argument("--ft-preserve-on", default="prose", choices=("prose", "prose,sudoku"),
                   help="text of the preservation term: built-in prose, or half prose and half Sudoku problems")
    p.add_argument("--task-share", type=float, default=0.4,
                   help="share of the training/held-out tokens that is task text (half Countdown, half Sudoku)")
    p.add_argument("--total-tokens", type=int, default=total_tokens)
    p.add_argument("--expansion", type=int, default=expansion)
    p.add_argument("--k", type=int, default=k)
    p.add_argument("--lr", type=float, default=3e-3, help="dictionary learning rate (short runs need a high one)")


def study_setup(args, prefix: str, eval_every: int, used: tuple[int, ...] = (0, 1, 2)):
    """The checkpoints `used` of CHECKPOINTS (the Countdown fine-tune made when missing and used), the mixed text and
    the run config; the run folder name carries every setting, so an interrupted run resumes."""
    from dlmscope.training import TrainSAEConfig

    work = ROOT / "runs"
    paths = {i: getattr(args, algo.replace("-", "_")) for i, algo in RL_ALGOS.items()}
    for i in used:
        if i in paths and not (paths[i] / "config.json").is_file():
            raise SystemExit(f"missing {RL_ALGOS[i]} checkpoint {paths[i]}; run: dlmscope rspo --algo {RL_ALGOS[i]} "
                             f"--task sudoku --steps 30 --out runs/rl-{RL_ALGOS[i]}")
    tag = _ft_tag(args.ft_params, args.ft_preserve, args.ft_preserve_on)
    countdown = work / f"countdown-ft-{args.ft_steps}-lr{args.ft_lr:g}{tag}"
    if 2 in used:
        finetune_countdown(countdown, args.ft_steps, args.ft_lr, args.ft_params, args.ft_preserve, args.ft_preserve_on)
    data = mixed_text(work, args.task_share)
    paths |= {0: "dlmscope-tiny-dlm", 2: countdown}
    ckpts = [str(paths[i]) for i in used]
    name = (f"{prefix}-{args.total_tokens}-e{args.expansion}-k{args.k}-ft{args.ft_steps}x{args.ft_lr:g}{tag}"
            f"-task{args.task_share:g}")
    cfg = TrainSAEConfig(model=ckpts[0], layers="1", k=str(args.k), total_tokens=args.total_tokens, dataset=str(data),
                         out=str(work), name=name, eval_every=eval_every, checkpoint_every=eval_every, progress=False,
                         seed=0, batch_size=256, lr=args.lr, policy="all", expansion=args.expansion,
                         resume=(work / name / "checkpoint.json").is_file())
    config = {"checkpoints": ckpts, "total_tokens": args.total_tokens, "ft_steps": args.ft_steps, "ft_lr": args.ft_lr,
              "ft_params": args.ft_params, "ft_preserve": args.ft_preserve, "ft_preserve_on": args.ft_preserve_on,
              "finetune": json.loads((countdown / "finetune.json").read_text()) if 2 in used else None,
              "task_share": args.task_share,
              "lr": args.lr, "batch_size": 256, "k": args.k, "n_latents": args.expansion * 256, "policy": "all",
              "hook": HOOK}
    return ckpts, data, cfg, config


def _codes(cc, text):
    """Latent activations on the held-out text and each latent's relative norm toward the later checkpoint."""
    import torch

    from dlmscope.analysis.diffing import decoder_stats

    with torch.no_grad():
        return cc.encode(text.acts), decoder_stats(cc)["relative_norm"][:, 0]


def _example_kinds(f, latents: list[int], kinds: list[str]) -> dict[str, int]:
    """How many of the top-5 held-out examples of `latents` lie in each kind of document."""
    found = []
    for j in latents:
        col = f[:, j]
        if (n := int((col > 0).sum())) > 0:
            found += [kinds[i] for i in col.topk(min(5, n)).indices.tolist()]
    return {k: found.count(k) for k in KINDS}


def _paper_rule(cc, text, kinds: list[str]) -> dict:
    """Latents specific under the paper's rule (alive on the held-out text), per side, with the kinds of document
    their top-5 held-out examples lie in."""
    f, rel = _codes(cc, text)
    out = {}
    for side, mask in (("later", rel > PAPER_RULE), ("base", rel < 1 - PAPER_RULE)):
        out[side] = int((mask & (f > 0).any(0)).sum())
        out[f"examples_{side}"] = _example_kinds(f, mask.nonzero().flatten().tolist(), kinds)
    return out


def _most_leaning(cc, text, kinds: list[str], n: int = LEANING_N) -> dict:
    """A read without a threshold (added after the narrow control's rule count came back empty): the n alive
    latents with the highest relative norm and the n with the lowest, their relative-norm range and the kinds of
    document their top-5 held-out examples lie in; `all`: the same for every alive latent, the reference."""
    f, rel = _codes(cc, text)
    alive = (f > 0).any(0).nonzero().flatten()
    order = alive[rel[alive].argsort()].tolist()
    out = {"all": _example_kinds(f, order, kinds)}
    for side, idx in (("later", order[-n:]), ("base", order[:n])):
        out[side] = {"relative_norm": [rel[idx].min().item(), rel[idx].max().item()],
                     "examples": _example_kinds(f, idx, kinds)}
    return out


def pair_checkpoints(pairs: list[str]) -> tuple[tuple[int, ...], dict[str, tuple[int, int]]]:
    """The checkpoints (indices into CHECKPOINTS) the pairs need, and each pair's indices into them; a run without
    a checkpoint neither needs nor computes its activations."""
    used = tuple(sorted({i for p in pairs for i in PAIRS[p]}))
    return used, {p: (used.index(PAIRS[p][0]), used.index(PAIRS[p][1])) for p in pairs}


def run(args) -> dict:
    import torch

    from dlmscope.analysis.diffing import crosscoder_report, paired_text, PairedText
    from dlmscope.data import pack
    from dlmscope.models import load_model
    from dlmscope.sae.crosscoder import load_crosscoder
    from dlmscope.training import split_texts

    torch.set_num_threads(1)
    pairs = args.pairs.split(",")
    if unknown := set(pairs) - set(PAIRS):
        raise SystemExit(f"unknown pairs {sorted(unknown)}; allowed: {', '.join(PAIRS)}")
    used, study_pairs = pair_checkpoints(pairs)
    ckpts, data, cfg, config = study_setup(args, "diff-cc" + ("" if pairs == list(DEFAULT_PAIRS) else "-" + "-".join(pairs)),
                                           eval_every=200, used=used)
    study = _study_run_class()
    study.saes, study.pairs = {}, study_pairs
    study = study(cfg, ckpts)
    result = study.run()
    lms = [load_model(c) for c in ckpts]
    _, heldout = split_texts(str(data), "text")
    packed = pack(lms[0].tokenizer, heldout, 128)
    rows, owners = packed.input_ids[:args.n_seqs], packed.doc_ids[:args.n_seqs]
    text = paired_text(lms, config["hook"], rows, seed=2)
    kinds = [_is_task_text(heldout[int(i)]) or "prose" for i in owners.flatten()]
    d = lms[0].d_model
    res = {"config": {**config, "pairs": pairs, "n_seqs": args.n_seqs, "threshold": 0.9, "paper_rule": PAPER_RULE, "nu_max": 0.3,
                      "heldout_token_kinds": {k: kinds.count(k) for k in KINDS}},
           "crosscoders": {}, "final": {k: {m: v[m] for m in ("fvu", "l0", "dead_fraction")}
                                        for k, v in result.metrics.items()}}
    for key, folder in result.saes.items():
        a, b = study.slices[key]
        pair = PairedText(text.x0, text.xt, text.masked,
                          torch.cat([text.acts[:, a * d:(a + 1) * d], text.acts[:, b * d:(b + 1) * d]], 1))
        cc = load_crosscoder(folder)
        r = crosscoder_report(cc, pair, lms[0], n_examples=5)
        e = r["per_checkpoint"][0]
        for side in ("later", "base"):  # which held-out document each top example comes from
            for lat in e[f"specific_{side}"]["latents"]:
                for ex in lat["examples"]:
                    ex["doc_kind"] = kinds[ex["row"] * rows.shape[1] + ex["position"]]
        e["paper_rule"] = _paper_rule(cc, pair, kinds)
        e["most_leaning"] = _most_leaning(cc, pair, kinds)
        res["crosscoders"][key] = {m: r[m] for m in ("fvu", "l0", "n_alive")} | {"per_checkpoint": r["per_checkpoint"]}
    return res


def _mean_ci(values: list[float], floor: float = float("-inf")) -> tuple[float, float, float]:
    """Mean and t-based 95% interval over seeds (n = 3: t = 4.303), the lower end clipped at `floor`."""
    import statistics

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, m, m
    t = {2: 12.706, 3: 4.303, 4: 3.182}.get(len(values), 2.0)
    half = t * statistics.stdev(values) / len(values) ** 0.5
    return m, max(floor, m - half), m + half


def _kinds(es: list[dict], side: str) -> dict[str, int]:
    """How many top held-out examples of the latents specific to `side` (all seeds) lie in each kind of text."""
    kinds = [ex["doc_kind"] for e in es for lat in e[f"specific_{side}"]["latents"] for ex in lat["examples"]]
    return {k: kinds.count(k) for k in KINDS}


def _ft_words(ft: dict) -> str:
    """How the Countdown fine-tune was narrowed and what it changed (fine-tunes recorded before these fields: '')."""
    words = ""
    if ft.get("params", "all") != "all":
        words += f", training only {ft['params']} ({ft['n_trained']:,} weights)"
    if ft.get("preserve"):
        on = {"prose": "built-in prose", "prose,sudoku": "built-in prose and Sudoku problems (half each)"}
        words += (f", plus {ft['preserve']:g} x the relative squared change of the layer-1 residual on "
                  f"{on[ft.get('preserve_on', 'prose')]} against the base")
    if "eval" in ft:
        e = ft["eval"]
        words += (f"; held-out ELBO base -> fine-tune: prose {e['prose']['loss_base']:.3f} -> "
                  f"{e['prose']['loss_ft']:.3f}, "
                  f"Countdown {e['countdown']['loss_base']:.3f} -> {e['countdown']['loss_ft']:.3f}; relative squared "
                  f"change of the diffed activations: prose {e['prose']['drift']:.4f}, Countdown "
                  f"{e['countdown']['drift']:.4f}")
    return words


def _render_leaning(res: dict, summary: dict) -> str:
    """The threshold-free read (`_most_leaning`), summed over seeds, as a second table ('' for results without it)."""
    lines = []
    for pair in res["config"].get("pairs", DEFAULT_PAIRS):
        es = [r["per_checkpoint"][0] for k, r in res["crosscoders"].items() if k.startswith(f"cc-{pair}-")]
        if not all("most_leaning" in e for e in es):
            continue
        ml = [e["most_leaning"] for e in es]
        tot = lambda get: {k: sum(get(m)[k] for m in ml) for k in KINDS}  # noqa: E731
        share = lambda c: c["countdown"] / max(1, sum(c.values()))  # noqa: E731
        row = {"all": tot(lambda m: m["all"])}
        for side in ("later", "base"):
            row[side] = {"relative_norm": [min(m[side]["relative_norm"][0] for m in ml),
                                           max(m[side]["relative_norm"][1] for m in ml)],
                         "examples": tot(lambda m: m[side]["examples"])}
        row["countdown_share"] = {"later": share(row["later"]["examples"]), "base": share(row["base"]["examples"]),
                                  "all": share(row["all"])}
        summary[pair]["most_leaning"] = row
        cells = [f"{row[s]['relative_norm'][0]:.3f}-{row[s]['relative_norm'][1]:.3f} | "
                 f"{' / '.join(str(v) for v in row[s]['examples'].values())} ({row['countdown_share'][s]:.0%})"
                 for s in ("later", "base")]
        lines.append(f"| {pair} | {cells[0]} | {cells[1]} | {' / '.join(str(v) for v in row['all'].values())} "
                     f"({row['countdown_share']['all']:.0%}) |")
    if not lines:
        return ""
    return (f"\nWithout a threshold (read added after the rule's count; not a test): per seed the {LEANING_N} alive "
            f"latents with the highest relative norm (leaning to the later checkpoint) and the {LEANING_N} with the "
            f"lowest; their relative-norm range over seeds and the kinds of document their top-5 held-out examples lie "
            f"in, summed over seeds (Countdown / Sudoku / prose, Countdown share); the last column is the same for "
            f"every alive latent, the reference.\n\n"
            "| pair | most later-leaning: relative norm | their top examples | most base-leaning: relative norm | "
            "their top examples | all alive latents' top examples |\n|" + "---|" * 6 + "\n" + "\n".join(lines) + "\n")


def render(res: dict, out: Path, name: str = "diff_rspo") -> str:
    lines = ["| pair | FVU | alive | relative norm p1 / p99 | min / max | decoder cosine (median, shared) | "
             "specific to later | robust (Latent Scaling) | specific to base | robust | paper rule: later / base | "
             "top examples of later-specific latents: Countdown / Sudoku / prose | of base-specific | "
             "paper rule, top examples: later | base |",
             "|" + "---|" * 15]
    summary = {}
    fmt = lambda c: f"{c[0]:.1f} [{c[1]:.1f}, {c[2]:.1f}]"  # noqa: E731
    for pair in res["config"].get("pairs", DEFAULT_PAIRS):
        rs = [res["crosscoders"][k] for k in res["crosscoders"] if k.startswith(f"cc-{pair}-")]
        es = [r["per_checkpoint"][0] for r in rs]
        col = lambda f: _mean_ci([f(e) for e in es], floor=0.0)  # noqa: E731  (counts)
        later, robust = col(lambda e: e["specific_later"]["count"]), col(lambda e: e["specific_later"]["robust"])
        base, base_r = col(lambda e: e["specific_base"]["count"]), col(lambda e: e["specific_base"]["robust"])
        paper = col(lambda e: e["paper_rule"]["later"]), col(lambda e: e["paper_rule"]["base"])
        fvu = _mean_ci([r["fvu"] for r in rs])
        rel = [sorted(e["relative_norm"]) for e in es]
        pct = lambda q: _mean_ci([v[min(len(v) - 1, int(q * len(v)))] for v in rel])[0]  # noqa: E731
        p1, p99, lo, hi = pct(0.01), pct(0.99), min(v[0] for v in rel), max(v[-1] for v in rel)
        cos = _mean_ci([e["cosine_shared_median"] for e in es])
        kl, kb = _kinds(es, "later"), _kinds(es, "base")
        pl, pb = ({k: sum(e["paper_rule"][f"examples_{side}"][k] for e in es) for k in kl} for side in ("later", "base"))
        lines.append(f"| {pair} | {fvu[0]:.3f} | {_mean_ci([r['n_alive'] for r in rs])[0]:.0f} | {p1:.3f} / {p99:.3f} | "
                     f"{lo:.3f} / {hi:.3f} | {cos[0]:.3f} [{cos[1]:.3f}, {cos[2]:.3f}] | {fmt(later)} | {fmt(robust)} | "
                     f"{fmt(base)} | {fmt(base_r)} | {paper[0][0]:.1f} / {paper[1][0]:.1f} | "
                     f"{' / '.join(str(v) for v in kl.values())} | {' / '.join(str(v) for v in kb.values())} | "
                     f"{' / '.join(str(v) for v in pl.values())} | {' / '.join(str(v) for v in pb.values())} |")
        summary[pair] = {"fvu": fvu, "relative_norm_p1_p99": [p1, p99], "relative_norm_min_max": [lo, hi],
                         "cosine_shared_median": cos, "later": later, "robust": robust, "base": base,
                         "base_robust": base_r, "paper_rule_later": paper[0], "paper_rule_base": paper[1],
                         "examples_later": kl, "examples_base": kb, "paper_rule_examples_later": pl,
                         "paper_rule_examples_base": pb}
    c = res["config"]
    held = c["heldout_token_kinds"]
    summary["finetune"] = c["finetune"]
    leaning = _render_leaning(res, summary)
    ft = c["finetune"]
    ckpt_words = (f"Countdown checkpoint: {c['ft_steps']} AdamW steps at lr {c['ft_lr']:g} on Countdown problems only "
                  f"(ELBO loss {ft['loss_first10']:.2f} -> {ft['loss_last10']:.2f}){_ft_words(ft)}." if ft else
                  "Checkpoints: " + ", ".join("/".join(Path(k).parts[-2:]) if "/" in k else k for k in c["checkpoints"])
                  + " (RL: `dlmscope rspo --task sudoku --steps 30`, last checkpoint).")
    md = (f"Crosscoders (BatchTopK, {c['n_latents']} latents, k={c['k']}, {c['total_tokens']:,} tokens, lr {c['lr']}, "
          f"seeds 0-2) at {c['hook']}, every position of DLM-Scope-corrupted rows (t ~ U[0.05, 0.5]); text: built-in "
          f"corpus + {c['task_share']:.0%} task tokens (half Countdown, half Sudoku). {ckpt_words} "
          f"A latent is specific to the "
          f"later checkpoint when its relative decoder norm exceeds {c['threshold']} (to the base: below "
          f"{1 - c['threshold']:.1f}); robust when both Latent Scaling ratios are below {c['nu_max']}; paper rule: "
          f"Minder, Dumas et al.'s Delta_norm > 0.9 (relative norm > {c['paper_rule']:.3f}). Counts: mean over 3 seeds "
          f"[95% t-interval]; relative-norm percentiles over alive latents, mean over seeds; min / max over all seeds. "
          f"Example columns: the top-5 held-out examples of every specific latent (all seeds; our rule, then the "
          f"paper's) by the kind of document they lie in (Countdown / Sudoku / prose). Held-out: {c['n_seqs']} rows x 128 tokens ({held['countdown']} Countdown, {held['sudoku']} "
          f"Sudoku, {held['prose']} prose tokens).\n\n" + "\n".join(lines) + "\n" + leaning)
    atomic_write_json(out / f"{name}_summary.json", summary)
    atomic_write_text(out / f"{name}.md", md)
    return md

PAIR_LABELS = {"base_vs_base": "base vs base (identical weights)", "base_vs_rspo": "base vs RSPO (30 steps)",
               "base_vs_countdown": "base vs Countdown fine-tune", "base_vs_spg": "base vs SPG (30 steps)",
               "base_vs_diffu_grpo": "base vs diffu-GRPO (30 steps)"}
PRESERVED = {"prose": "prose", "prose,sudoku": "prose and Sudoku"}  # a fine-tune's preserve_on, in words
KIND_WORDS = {"countdown": "Countdown", "sudoku": "Sudoku", "prose": "prose"}


def _count(c: list[float]) -> str:
    """A mean count over seeds [95% t-interval]; '0 [0, 0]' when no seed found any."""
    return "0 [0, 0]" if not any(c) else f"{c[0]:.1f} [{c[1]:.1f}, {c[2]:.1f}]"


def _cells(row: dict, p1_p99: bool = True) -> str:
    """The columns every crosscoder table shares: relative norms, shared-decoder cosine."""
    lo, hi = row["relative_norm_min_max"]
    cos = row["cosine_shared_median"]
    norms = f"{row['relative_norm_p1_p99'][0]:.3f} / {row['relative_norm_p1_p99'][1]:.3f} | " if p1_p99 else ""
    return f"{norms}{lo:.3f} / {hi:.3f} | {cos[0]:.3f} [{cos[1]:.3f}, {cos[2]:.3f}]"


def _paper(row: dict) -> str:
    later, base = row["paper_rule_later"], row["paper_rule_base"]
    return "0 / 0" if not any(later + base) else f"{_count(later)} / {_count(base)}"


def _pairs(summary: dict) -> list[str]:
    return [k for k in summary if k != "finetune"]


def readme_table(summary: dict) -> str:
    """The README's table of <name>_summary.json (the study's pairs, our rule and the paper's)."""
    lines = ["| pair | relative norm p1 / p99 | min / max (3 seeds) | decoder cosine, shared latents | "
             "specific to later (> 0.9) | specific to base (< 0.1) | paper rule: later / base |", "|" + "---|" * 7]
    for pair in _pairs(summary):
        r = summary[pair]
        lines.append(f"| {PAIR_LABELS[pair]} | {_cells(r)} | {_count(r['later'])} | {_count(r['base'])} | {_paper(r)} |")
    return "\n".join(lines)


def readme_methods_table(summary: dict) -> str:
    """The README's table of diff_rl_methods_summary.json: the rule's counts and the threshold-free read."""
    lines = ["| pair | relative norm p1 / p99 | min / max (3 seeds) | decoder cosine, shared latents | specific to later | "
             "specific to base | paper rule: later / base | most base-leaning: Countdown / Sudoku / prose "
             "(all alive latents) |", "|" + "---|" * 8]
    for pair in _pairs(summary):
        r = summary[pair]
        ml = r["most_leaning"]
        kinds = f"{' / '.join(str(v) for v in ml['base']['examples'].values())} " \
                f"({' / '.join(f'{v:,}' for v in ml['all'].values())})"
        lines.append(f"| {PAIR_LABELS[pair]} | {_cells(r)} | {_count(r['later'])} | {_count(r['base'])} | {_paper(r)} | "
                     f"{kinds} |")
    return "\n".join(lines)


def readme_control_table(summary: dict, tokens: str = "600k") -> str:
    """The README's table of diff_rspo_control_summary.json: counts with their robust share and example kinds."""
    robust = lambda c: "none robust" if not any(c) else f"{c[0]:.1f} robust"  # noqa: E731
    kinds = lambda e: ", ".join(f"{v} {KIND_WORDS[k]}" for k, v in e.items() if v) or "none"  # noqa: E731
    lines = ["| pair | relative norm p1 / p99 | min / max (3 seeds) | decoder cosine, shared latents | "
             "specific to later (> 0.9) | specific to base (< 0.1) | paper rule: later / base | "
             "top-5 examples of specific latents: later / base |", "|" + "---|" * 8]
    for pair in _pairs(summary):
        r = summary[pair]
        lines.append(f"| {PAIR_LABELS[pair]}, {tokens} tokens | {_cells(r)} | {_count(r['later'])}, "
                     f"{robust(r['robust'])} | {_count(r['base'])}, {robust(r['base_robust'])} | {_paper(r)} | "
                     f"{kinds(r['examples_later'])} / {kinds(r['examples_base'])} |")
    return "\n".join(lines)


def readme_narrow_table(*summaries: dict) -> str:
    """The README's table of the narrow fine-tunes' summaries (one row each): the rule's counts, then the share of
    the top examples of the most leaning latents that lie in Countdown text (the dominant kind when it is not)."""
    def share(e: dict, dominant: bool) -> str:
        n, cd = sum(e.values()), e["countdown"]
        top = max(e, key=e.get)
        extra = f"; {e[top]} {KIND_WORDS[top]}" if dominant and top != "countdown" else ""
        return f"{cd:,} of {n:,} ({cd / n:.0%}{extra})"

    lines = ["| narrow fine-tune, preserving | relative norm min / max (3 seeds) | decoder cosine, shared latents | "
             "specific to later (> 0.9) | specific to base (< 0.1) | paper rule: later / base | top examples in "
             "Countdown: 10 most later-leaning | 10 most base-leaning | all alive latents |", "|" + "---|" * 9]
    for summary in summaries:
        r = summary["base_vs_countdown"]
        ml = r["most_leaning"]
        lines.append(f"| {PRESERVED[summary['finetune'].get('preserve_on', 'prose')]} | {_cells(r, p1_p99=False)} | "
                     f"{_count(r['later'])} | {_count(r['base'])} | {_paper(r)} | "
                     f"{share(ml['later']['examples'], True)} | {share(ml['base']['examples'], True)} | "
                     f"{share(ml['all'], False)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_study_options(p, total_tokens=300_000, expansion=4, k=32)
    p.add_argument("--n-seqs", type=int, default=48)
    p.add_argument("--pairs", default=",".join(DEFAULT_PAIRS), help="comma-separated subset of " + ", ".join(PAIRS))
    p.add_argument("--name", default="diff_rspo", help="results name: <out>/<name>.{json,md}, <name>_summary.json")
    name = p.parse_known_args()[0].name
    run_or_render(p, name, run, lambda res, out: render(res, out, name))


if __name__ == "__main__":
    main()
