"""The positive control of model diffing: a planted feature of known direction, strength and firing frequency, and
the smallest one each lens finds; then base vs the RL checkpoints read against that limit.

Checkpoints: base = dlmscope-tiny-dlm; planted = `analysis.planted.plant_feature(base, 1, u, trigger, s * rms)`: the
layer-1 residual (the diffed hook, as in experiments/diff_rspo.py) gains s * rms * u at every visible position whose
input token is the trigger, and nothing else (rms: root mean squared norm of that residual on the training stream;
u: a random unit direction drawn per seed). The trigger is the one token whose visible share of the training stream
is closest to each `--frequencies` level. Text and positions as in diff_rspo.py: the built-in corpus plus 40% task
tokens, every position of DLM-Scope-corrupted rows (t ~ U[0.05, 0.5]). The base's activations are computed once;
the planted checkpoint's are base + the edit, checked against a forward of the planted model on the first rows of
every condition.

Per (frequency, strength, seed in 0-2; the seed draws u, the dictionaries' starts and the data order), each lens
trains on the same stream and is read on held-out rows:
- crosscoder (BatchTopK, independent decoder starts): found when an alive latent's planted-side decoder has cosine
  > 0.9 with u and its relative norm exceeds 0.9 (the study's count rule); recorded beside it: the best cosine of
  any latent's decoder difference d_planted - d_base with u (the change absorbed into a shared latent) and the
  threshold-free test of the relative norms against the same seed's base-vs-base crosscoder;
- diff-SAE (Top-K on planted - base): found when an alive latent's decoder has cosine > 0.9 with u (every diff-SAE
  latent is about the difference);
- SAE lens (Top-K SAEs on each checkpoint, as experiments/diff_sae_matching.py): found when an alive latent of the
  planted model's SAE has cosine > 0.9 with u and no latent of the base SAE (same seed) does.
An activation-level control (no checkpoint makes it): the same direction at strength RANDOM[1] on a random RANDOM[0]
of positions, whatever their token, a feature no base latent tracks (`random_cells`). Then base vs each RL checkpoint
found (`--rspo`, `--spg`, `--diffu-grpo`), the same crosscoder settings and seeds:
specific latents under the rule and the threshold-free test, with the relative squared change of the diffed
activations, the scale on which a planted feature's size is s^2 x its firing rate.

Resumable: every finished cell is written to the result JSON at once; a rerun skips cells already there (the
settings are checked against the file's). Writes experiments/results/diff_planted.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT))

import diff_rspo  # noqa: E402
from _study import run_or_render  # noqa: E402
from dlmscope.io_utils import atomic_write_json, atomic_write_text  # noqa: E402

HOOK, LAYER = "blocks.1.hook_resid_post", 1
RANDOM = (0.01, 4.0)  # share and strength of the activation-level control on random positions (no trigger token)
AUX = {"aux_coef": 1 / 8, "dead_tokens": 10_000, "k_aux": 256}  # AuxK as tuned for the crosscoders (README)
COS, REL = 0.9, 0.9  # the found rule: decoder cosine with the planted direction; relative norm (crosscoder)
LENSES = ("crosscoder", "diff_sae", "sae_lens")
# How each cell is read, in table order: the rule of each lens (fixed before the runs), then two crosscoder reads
# added after the pilot showed the planted direction absorbed into a shared latent: that latent's decoder difference,
# and the threshold-free test against the base-vs-base crosscoder (KS p < 0.05).
READINGS = {
    "crosscoder": ("crosscoder: rule (cosine > 0.9, relative norm > 0.9)", lambda c: c["crosscoder"]["found"]),
    "crosscoder_difference": ("crosscoder: a decoder difference d_planted - d_base at cosine > 0.9",
                              lambda c: (c["crosscoder"]["best_cos_difference"] or -1.0) > COS),
    "crosscoder_ks": ("crosscoder: relative norms vs base-vs-base, KS p < 0.05",
                      lambda c: c["crosscoder"]["null_test"]["ks_pvalue"] < 0.05),
    "diff_sae": ("diff-SAE: rule (a latent at cosine > 0.9)", lambda c: c["diff_sae"]["found"]),
    "sae_lens": ("SAE lens: rule (a latent at cosine > 0.9, none in the base SAE)", lambda c: c["sae_lens"]["found"]),
}
RL = ("rspo", "spg", "diffu-grpo")


def settings(args) -> dict:
    return {"hook": HOOK, "tokens": args.tokens, "heldout_rows": args.heldout_rows, "context": 128,
            "n_latents": args.n_latents, "k": args.k, "lr": args.lr, "batch_size": 256, "task_share": 0.4,
            "strengths": [float(s) for s in args.strengths.split(",")],
            "frequencies": [float(f) for f in args.frequencies.split(",")],
            "seeds": [int(s) for s in args.seeds.split(",")], "cos_rule": COS, "relative_norm_rule": REL,
            "decoder_init": "independent", "aux_coef": AUX["aux_coef"], "dead_tokens": AUX["dead_tokens"],
            "k_aux": AUX["k_aux"]}


def stream(work: Path, cfg: dict, lms: list) -> dict:
    """Training and held-out activations of `lms` at HOOK on the identical corrupted rows, with the corrupted input
    tokens (flattened); cached in `work` per checkpoint list."""
    from safetensors.torch import load_file

    from dlmscope.analysis.diffing import paired_text
    from dlmscope.data import pack
    from dlmscope.io_utils import atomic_save_safetensors
    from dlmscope.training import split_texts

    path = work / f"stream-{cfg['tokens']}-{cfg['heldout_rows']}-{len(lms)}.safetensors"
    names = json.dumps([lm.name for lm in lms])
    if path.is_file() and (work / (path.name + ".json")).read_text() == names:
        return load_file(str(path))
    train, held = split_texts(str(diff_rspo.mixed_text(ROOT / "runs", cfg["task_share"])), "text")
    n_rows = cfg["tokens"] // cfg["context"]
    out = {}
    for split, texts, rows, seed in (("train", train, n_rows, 0), ("heldout", held, cfg["heldout_rows"], 2)):
        ids = pack(lms[0].tokenizer, texts, cfg["context"]).input_ids[:rows]
        t = paired_text(lms, HOOK, ids, seed=seed)
        out[split] = t.acts.contiguous()
        out[f"{split}_tokens"] = t.xt.flatten().contiguous()
        out[f"{split}_rows"] = t.xt.contiguous()
    atomic_save_safetensors(path, out)
    atomic_write_text(work / (path.name + ".json"), names)
    return out


def pick_trigger(tokens, target: float, exclude: set[int]) -> tuple[int, float]:
    """The token whose share of `tokens` is closest to `target` (in log ratio), and its share."""
    import torch

    counts = torch.bincount(tokens, minlength=int(tokens.max()) + 1).double() / tokens.numel()
    counts[list(exclude)] = 0
    ok = counts > 0
    gap = (counts[ok].log() - torch.tensor(target).log()).abs()
    tok = int(ok.nonzero().flatten()[gap.argmin()])
    return tok, float(counts[tok])


def direction(seed: int, d: int):
    import torch

    return torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(1000 + seed)), dim=0)


def check_planted(base, rows, u, trigger: int, add: float) -> float:
    """Max |difference| between the planted model's real forward and base + edit on `rows` (must be ~0)."""
    from dlmscope.analysis.planted import plant_feature
    from dlmscope.hooks import run_with_cache

    planted = plant_feature(base, LAYER, u, trigger, add)
    a, b = (run_with_cache(m, rows, [HOOK])[HOOK].flatten(0, 1) for m in (base, planted))
    fires = (rows.flatten() == trigger).float()[:, None]
    return float((b - (a + add * fires * u)).abs().max())


def _train(trainer, x, seed: int):
    """Train on x in a seeded order; scale and b_dec come from 4,096 tokens, not the first batch of 256 (a batch of
    differences without a trigger token is all zeros, and its input scale would be 1e8)."""
    import torch

    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    trainer.initialise(x[order[:4096]])
    for i in range(x.shape[0] // 256):
        trainer.step(x[order[i * 256:(i + 1) * 256]])
    return trainer


def train_crosscoder(cfg: dict, x, seed: int, aux: dict | None = None, resample_every: int = 0):
    from dlmscope.sae import TrainConfig
    from dlmscope.sae.crosscoder import CrossCoderConfig, CrossCoderTrainer

    d = x.shape[1] // 2
    tr = CrossCoderTrainer(CrossCoderConfig(d, cfg["n_latents"], cfg["k"], ["base", "other"],
                                            {"hook_name": HOOK}, cfg["decoder_init"]),
                           TrainConfig(total_tokens=x.shape[0], batch_size=256, lr=cfg["lr"], seed=seed,
                                       **(AUX if aux is None else aux)), resample_every=resample_every)
    return _train(tr, x, seed)


def train_sae(cfg: dict, x, seed: int):
    from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig

    tr = SAETrainer(SAEConfig(x.shape[1], cfg["n_latents"], cfg["k"], "topk", {"hook_name": HOOK}),
                    TrainConfig(total_tokens=x.shape[0], batch_size=256, lr=cfg["lr"], seed=seed,
                                optimizer="adam"))  # what the committed sweep ran (before signum_sf became the default)
    return _train(tr, x, seed)


def _alive(trainer, x):
    from dlmscope.sae.metrics import evaluate_sae

    with trainer.averaged():
        ev = evaluate_sae(trainer.sae, x)
    return ev["density"] > 0, ev


def read_crosscoder(trainer, xh, u, null=None) -> dict:
    """The found rule and what else the crosscoder shows about u (module docstring)."""
    import torch

    from dlmscope.analysis.diffing import decoder_stats, relative_norm_test

    alive, ev = _alive(trainer, xh)
    cc = trainer.sae
    w = cc.W_dec.detach().float()
    rel = decoder_stats(cc)["relative_norm"][:, 0]
    cos = torch.nn.functional.normalize(w[1], dim=1) @ u
    cos_diff = torch.nn.functional.normalize(w[1] - w[0], dim=1) @ u
    found = alive & (cos > COS) & (rel > REL)
    best = int(torch.where(alive, cos, torch.full_like(cos, -2)).argmax())
    out = {"found": bool(found.any()), "n_alive": int(alive.sum()), "dead_fraction": 1 - float(alive.float().mean()),
           "train_dead_fraction": float((trainer.since_fired >= trainer.dead_tokens).float().mean()),
           "fvu": ev["fvu"], "best_cos": float(cos[best]), "best_cos_relative_norm": float(rel[best]),
           "best_cos_density": float(ev["density"][best]),
           "best_cos_difference": float(cos_diff[alive].max()) if bool(alive.any()) else None,
           "specific_later": int((alive & (rel > REL)).sum()), "specific_base": int((alive & (rel < 1 - REL)).sum()),
           "relative_norm_min_max": [float(rel[alive].min()), float(rel[alive].max())]}
    if null is not None:
        out["null_test"] = relative_norm_test(rel[alive], torch.tensor(null), n_permutations=1000)
    return out


def read_sae(trainer, x, u, base_cos: float | None = None) -> dict:
    """found: an alive latent with cosine > COS with u (and, for the SAE lens, none in the base SAE: `base_cos`)."""
    import torch

    alive, ev = _alive(trainer, x)
    cos = torch.nn.functional.normalize(trainer.sae.W_dec.detach().float(), dim=1) @ u
    best = float(cos[alive].max()) if bool(alive.any()) else -1.0
    found = best > COS and (base_cos is None or base_cos <= COS)
    return {"found": found, "best_cos": best, "n_alive": int(alive.sum()), "fvu": ev["fvu"]}


def lens_cell(cfg: dict, res: dict, x, xh, edit, edit_h, u, seed: int) -> dict:
    """The three lenses on base x against x + edit (training) and xh against xh + edit_h (held-out)."""
    import torch

    xp, xph = x + edit, xh + edit_h
    return {"drift": float(edit.pow(2).sum() / x.pow(2).sum()),
            "crosscoder": read_crosscoder(train_crosscoder(cfg, torch.cat([x, xp], 1), seed), torch.cat([xh, xph], 1),
                                          u, res["null"][str(seed)]["relative_norm"]),
            "diff_sae": read_sae(train_sae(cfg, edit, seed), edit_h, u),
            "sae_lens": read_sae(train_sae(cfg, xp, seed), xph, u, res["base_sae"][str(seed)]["best_cos"])}


def _save(out: Path, res: dict) -> None:
    atomic_write_json(out / "diff_planted.json", res)


def run(args) -> dict:
    import torch

    from dlmscope.models import load_model

    torch.set_num_threads(1)
    cfg = settings(args)
    path = args.out / "diff_planted.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    grid = ("strengths", "frequencies")  # cells are keyed by these: a grid may grow or shrink between runs
    if {k: v for k, v in res.get("settings", cfg).items() if k not in grid} != \
            {k: v for k, v in cfg.items() if k not in grid}:
        raise SystemExit(f"{path} holds other settings; move it away or pass the same ones:\n{res['settings']}")
    res = {"triggers": {}, "null": {}, "base_sae": {}, "cells": {}, "rl": {}} | res | {"settings": cfg}
    work = ROOT / "runs" / "diff_planted"
    work.mkdir(parents=True, exist_ok=True)
    base = load_model("dlmscope-tiny-dlm")
    s = stream(work, cfg, [base])
    x, xh = s["train"], s["heldout"]
    rms = float(x.pow(2).sum(1).mean().sqrt())
    res["rms"] = rms
    special = {i for i in (base.mask_id, base.pad_id, base.eos_id, 0) if i is not None}
    d = x.shape[1]
    seeds = cfg["seeds"]
    for seed in seeds:  # the null crosscoder (base vs base) and the base SAE of each seed
        u = direction(seed, d)
        if str(seed) not in res["null"]:
            tr = train_crosscoder(cfg, torch.cat([x, x], 1), seed)
            alive, _ = _alive(tr, torch.cat([xh, xh], 1))
            from dlmscope.analysis.diffing import decoder_stats

            rel = decoder_stats(tr.sae)["relative_norm"][:, 0][alive]
            res["null"][str(seed)] = {"relative_norm": rel.tolist(), "n_alive": int(alive.sum()),
                                      "train_dead_fraction": float((tr.since_fired >= tr.dead_tokens).float().mean())}
            _save(args.out, res)
        if str(seed) not in res["base_sae"]:
            res["base_sae"][str(seed)] = read_sae(train_sae(cfg, x, seed), xh, u)
            _save(args.out, res)
    for freq in cfg["frequencies"]:
        trigger, share = pick_trigger(s["train_tokens"], freq, special)
        res["triggers"][str(freq)] = {"token": trigger, "text": base.to_text([trigger]), "share": share,
                                      "heldout_share": float((s["heldout_tokens"] == trigger).float().mean())}
        fires, fires_h = ((s[k] == trigger).float()[:, None] for k in ("train_tokens", "heldout_tokens"))
        for strength in cfg["strengths"]:
            for seed in seeds:
                key = f"f{freq:g}-s{strength:g}-seed{seed}"
                if key in res["cells"]:
                    continue
                u, add = direction(seed, d), strength * rms
                err = check_planted(base, s["train_rows"][:8], u, trigger, add)
                if err > 1e-3 * rms:
                    raise SystemExit(f"{key}: planted model differs from base + edit by {err}")
                res["cells"][key] = {"check_max_abs": err, **lens_cell(cfg, res, x, xh, fires * u * add,
                                                                       fires_h * u * add, u, seed)}
                _save(args.out, res)
                print(key, {k: res["cells"][key][k]["found"] for k in LENSES}, flush=True)
    share, strength = RANDOM  # the same direction on random positions: a feature no base latent tracks
    for seed in seeds:
        key = f"random{share:g}-s{strength:g}-seed{seed}"
        if key in res.setdefault("random_cells", {}):
            continue
        gen = torch.Generator().manual_seed(2000 + seed)
        fires, fires_h = ((torch.rand(n, 1, generator=gen) < share).float() for n in (x.shape[0], xh.shape[0]))
        u = direction(seed, d)
        res["random_cells"][key] = lens_cell(cfg, res, x, xh, fires * u * strength * rms,
                                             fires_h * u * strength * rms, u, seed)
        _save(args.out, res)
        print(key, {k: res["random_cells"][key][k]["found"] for k in LENSES}, flush=True)
    for algo in RL:
        ckpt = getattr(args, algo.replace("-", "_"))
        log = ckpt.parent / "log.json"  # the RL run's own record: its settings and evaluations
        if algo in res["rl"] and "rl_config" not in res["rl"][algo] and log.is_file():
            res["rl"][algo]["rl_config"] = json.loads(log.read_text())["config"]
            _save(args.out, res)
        if algo in res["rl"] or not (ckpt / "config.json").is_file():
            continue
        other = load_model(str(ckpt))
        sp = stream(work / algo, cfg, [base, other])
        xo, xoh = (sp[k][:, d:] for k in ("train", "heldout"))
        assert torch.equal(sp["train"][:, :d], x)  # the same rows and corruption as the planted cells
        entry = {"checkpoint": str(ckpt), "drift": float((xo - x).pow(2).sum() / x.pow(2).sum()), "seeds": {},
                 "rl_config": json.loads(log.read_text())["config"] if log.is_file() else None}
        for seed in seeds:
            entry["seeds"][str(seed)] = read_crosscoder(train_crosscoder(cfg, torch.cat([x, xo], 1), seed),
                                                        torch.cat([xh, xoh], 1), direction(seed, d),
                                                        res["null"][str(seed)]["relative_norm"])
        res["rl"][algo] = entry
        _save(args.out, res)
    return res


# ------------------------------------------------------------------------------------------------ the tables

def found_counts(res: dict) -> dict:
    """Per lens, frequency and strength: [found, seeds] and the Clopper-Pearson interval of the found rate."""
    from dlmscope.stats import clopper_pearson

    c, out = res["settings"], {}
    for lens, (_, read) in READINGS.items():
        for f in c["frequencies"]:
            for s in c["strengths"]:
                got = [bool(read(res["cells"][k])) for seed in c["seeds"]
                       if (k := f"f{f:g}-s{s:g}-seed{seed}") in res["cells"]]
                if got:
                    out[f"{lens}|{f:g}|{s:g}"] = {"found": sum(got), "n": len(got),
                                                   "rate": clopper_pearson(sum(got), len(got))}
    return out


def detection_limits(res: dict) -> dict:
    """Per lens and frequency: the smallest strength found in every seed, with every larger strength found in every
    seed too (None: no such strength in the grid)."""
    counts, c, out = found_counts(res), res["settings"], {}
    for lens in READINGS:
        for f in c["frequencies"]:
            limit = None
            for s in sorted(c["strengths"], reverse=True):
                e = counts.get(f"{lens}|{f:g}|{s:g}")
                if e is None or e["found"] < e["n"] or e["n"] < len(c["seeds"]):
                    break
                limit = s
            out[f"{lens}|{f:g}"] = limit
    return out


def readme_table(res: dict) -> str:
    c, counts = res["settings"], found_counts(res)
    head = "| reading | trigger share | " + " | ".join(f"strength {s:g}" for s in c["strengths"]) + " |"
    lines = [head, "|" + "---|" * (2 + len(c["strengths"]))]
    for lens, (name, _) in READINGS.items():
        for f in c["frequencies"]:
            trig = res["triggers"].get(str(f))
            if trig is None:
                continue
            cells = []
            for s in c["strengths"]:
                e = counts.get(f"{lens}|{f:g}|{s:g}")
                cells.append("-" if e is None else f"{e['found']}/{e['n']} [{e['rate'][1]:.2f}, {e['rate'][2]:.2f}]")
            lines.append(f"| {name} | {trig['share']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def readme_rl_table(res: dict) -> str:
    lines = ["| pair | activation change | specific to later / base (per seed) | relative norm min / max | "
             "KS D (p), per seed | spread vs null (permutation p), per seed |", "|---|---|---|---|---|---|"]
    for algo, e in res["rl"].items():
        ss = list(e["seeds"].values())
        lines.append(
            f"| base vs {algo} | {e['drift']:.4f} | "
            + ", ".join(f"{r['specific_later']} / {r['specific_base']}" for r in ss) + " | "
            + f"{min(r['relative_norm_min_max'][0] for r in ss):.3f} / {max(r['relative_norm_min_max'][1] for r in ss):.3f} | "
            + ", ".join(f"{r['null_test']['ks_statistic']:.3f} ({r['null_test']['ks_pvalue']:.2g})" for r in ss) + " | "
            + ", ".join(f"{r['null_test']['spread']:.4f} vs {r['null_test']['spread_null']:.4f} "
                        f"({r['null_test']['spread_pvalue']:.2g})" for r in ss) + " |")
    return "\n".join(lines) + "\n"


def summary(res: dict) -> dict:
    """What the README's prose reads: found counts and limits, and ranges over the cells."""
    cells = list(res["cells"].values())
    span = lambda v: [sum(v) / len(v), min(v), max(v)] if v else None  # noqa: E731
    by_condition = {}
    for key, c in res["cells"].items():
        cond = key.rsplit("-seed", 1)[0]
        e = by_condition.setdefault(cond, {"drift": c["drift"], "best_cos": [], "relative_norm": [],
                                           "cos_difference": [], "ks_pvalue": [], "spread_pvalue": []})
        cc = c["crosscoder"]
        for name, v in (("best_cos", cc["best_cos"]), ("relative_norm", cc["best_cos_relative_norm"]),
                        ("cos_difference", cc["best_cos_difference"]), ("ks_pvalue", cc["null_test"]["ks_pvalue"]),
                        ("spread_pvalue", cc["null_test"]["spread_pvalue"])):
            e[name].append(v)
    return {"found": found_counts(res), "limits": detection_limits(res), "conditions": by_condition,
            "crosscoder_dead_fraction": span([c["crosscoder"]["dead_fraction"] for c in cells]),
            "null_dead_fraction": span([1 - v["n_alive"] / res["settings"]["n_latents"] for v in res["null"].values()]),
            "crosscoder_specific_later_max": max((c["crosscoder"]["specific_later"] for c in cells), default=None),
            "crosscoder_best_relative_norm": span([c["crosscoder"]["best_cos_relative_norm"] for c in cells]),
            "diff_sae_fvu": span([c["diff_sae"]["fvu"] for c in cells]),
            "diff_sae_alive": span([c["diff_sae"]["n_alive"] for c in cells]),
            "diff_sae_best_cos": span([c["diff_sae"]["best_cos"] for c in cells]),
            "sae_lens_best_cos": span([c["sae_lens"]["best_cos"] for c in cells]),
            "base_sae_best_cos": span([v["best_cos"] for v in res["base_sae"].values()]),
            "null_relative_norm": [min(min(v["relative_norm"]) for v in res["null"].values()),
                                   max(max(v["relative_norm"]) for v in res["null"].values())],
            "rl_drift": {a: e["drift"] for a, e in res["rl"].items()}}


def render(res: dict, out: Path) -> str:
    c = res["settings"]
    limits = detection_limits(res)
    atomic_write_json(out / "diff_planted_summary.json", summary(res))
    lim = "; ".join(f"{k.replace('|', ' at share ')}: {v if v is not None else 'none in the grid'}"
                    for k, v in limits.items())
    md = (f"Planted feature at {c['hook']} (strength x rms {res.get('rms', float('nan')):.3f} of the residual), "
          f"{c['tokens']:,} tokens, {c['n_latents']} latents, k={c['k']}, lr {c['lr']}, seeds {c['seeds']}. "
          f"Found: seeds whose dictionary has the planted direction by the lens's rule (module docstring of "
          f"experiments/diff_planted.py) [95% Clopper-Pearson].\n\n" + readme_table(res)
          + f"\nSmallest strength found in every seed (and every larger one): {lim}.\n\n"
          + (readme_rl_table(res) if res["rl"] else "No RL checkpoint was found.\n"))
    atomic_write_text(out / "diff_planted.md", md)
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--strengths", default="0.25,1,4,16", help="planted strengths, in units of the residual's rms")
    p.add_argument("--frequencies", default="0.002,0.01", help="target shares of the trigger token")
    p.add_argument("--seeds", default="0,1,2", help="seeds (planted direction, dictionary starts, data order)")
    p.add_argument("--tokens", type=int, default=153_600, help="training tokens per dictionary")
    p.add_argument("--heldout-rows", type=int, default=96, help="held-out rows of 128 tokens the lenses are read on")
    p.add_argument("--n-latents", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    for algo in RL:
        p.add_argument(f"--{algo}", type=Path, default=ROOT / "runs" / f"rl-{algo}" / "checkpoint-00030",
                       help=f"the {algo} checkpoint (dlmscope rspo --algo {algo} --task sudoku --rl-steps 30)")
    run_or_render(p, "diff_planted", run, render)


if __name__ == "__main__":
    main()
