"""The SAE family side by side on dlmscope-tiny-dlm, layer 3, at matched sparsity (L0 ~ 32), two seeds.

Top-K, BatchTopK, JumpReLU (lambda steered to L0 = 32), Matryoshka BatchTopK (prefixes 128, 512, 2048)
on blocks.3.hook_resid_post and a skip transcoder blocks.3.hook_mlp_in -> blocks.3.hook_mlp_out,
`--expansion` x d_model latents each (the committed table: 4, i.e. 1,024, and 307,200 tokens), trained like
the shipped SAEs (masking policy `mask`, t ~ U[0.05, 0.5], batch 1024) on `--tokens` tokens. Seeds can run
as parallel processes (`--seed-list 0`, `--seed-list 1`, then `--merge`). Per seed one activation stream
(its own data order and masks) feeds all five
trainers, so the architectures see identical data. Each SAE then goes through `dlmscope evaluate`'s
suite; the table shows the mean over seeds and a 95% Student-t interval (n = 2: wide by design).
Writes experiments/results/sae_family.{json,md} and sae_family_summary.json (the numbers the README quotes);
`--render` rebuilds the table and summary from the JSON.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import RESULTS, run_or_render  # noqa: E402
from dlmscope.io_utils import atomic_write_text  # noqa: E402

ARCHS = ("topk", "batchtopk", "jumprelu", "matryoshka", "skip_transcoder")
LAYER = 3


def train_family(args, seed: int) -> dict:
    """Five trainers on one activation stream; {architecture: trained SAE}."""
    from tqdm import tqdm

    from dlmscope.activations import ActivationSource, ShuffleBuffer
    from dlmscope.data import pack
    from dlmscope.models import load_model
    from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig
    from dlmscope.training import split_texts

    lm = load_model("dlmscope-tiny-dlm", device=args.device)
    resid, mlp_in, mlp_out = (f"blocks.{LAYER}.hook_{s}" for s in ("resid_post", "mlp_in", "mlp_out"))
    rows = pack(lm.tokenizer, split_texts("builtin", "text")[0], 128)
    source = ActivationSource(lm, [resid, mlp_in, mlp_out], rows.input_ids, rows.doc_ids, seed=seed, seqs_per_batch=32)
    buffer = ShuffleBuffer(source, 65536, 1024, seed=seed)
    tcfg = TrainConfig(total_tokens=args.tokens, batch_size=1024, seed=seed)
    n_latents = args.expansion * lm.d_model
    meta = {"model_name": lm.name, "hook_name": resid, "masking_policy": source.policy, "t_range": [0.05, 0.5]}
    trainers = {}
    for arch in ARCHS:
        m = {**meta, "hook_name": mlp_in, "hook_name_out": mlp_out} if arch.endswith("transcoder") else meta
        prefixes = (n_latents // 16, n_latents // 4) if arch == "matryoshka" else ()
        trainers[arch] = SAETrainer(SAEConfig(lm.d_model, n_latents, 32, arch, m, prefixes), tcfg, args.device)
    for _ in tqdm(range(tcfg.steps), desc=f"seed {seed}"):
        b = buffer.next()
        for arch, tr in trainers.items():
            if arch.endswith("transcoder"):
                tr.step(b.acts[mlp_in], target=b.acts[mlp_out])
            else:
                tr.step(b.acts[resid])
    return {arch: tr.sae.eval() for arch, tr in trainers.items()}


def flatten(result: dict) -> dict[str, float]:
    """The suite's numbers that the table compares, under readable names."""
    core = result["core"]
    out = {}
    for p in ("all", "masked", "visible"):
        for m in ("fvu", "l0"):
            vals = [core[t][p][m] for t in core]
            out[f"{m.upper() if m == 'fvu' else 'L0'} {p} (mean over t bins)"] = sum(vals) / len(vals)
    out["dead fraction (t=0.3)"] = core["0.3"]["all"]["dead_fraction"]
    out["dense fraction (t=0.3)"] = core["0.3"]["all"]["dense_fraction"]
    for p in ("all", "masked", "visible"):
        splice = result["splice"][p]
        out[f"ΔCE spliced at {p} (mean over t bins)"] = sum(e["delta_ce"][0] for e in splice.values()) / len(splice)
    splice = result["splice"]["all"]
    out["ΔELBO spliced at all (mean over t bins)"] = sum(e["delta_elbo"][0] for e in splice.values()) / len(splice)
    out["latents mostly on masked positions"] = result["t_curves"]["mostly_masked_fraction"]
    out["latents mostly on visible positions"] = result["t_curves"]["mostly_visible_fraction"]
    for name, pr in result["probing"].items():
        if "sae" not in pr:
            continue
        for k in ("1", "5"):
            out[f"probe {name} k={k} (masked / visible)"] = (pr["sae"][k]["masked"], pr["sae"][k]["visible"])
        out[f"probe {name} residual (masked / visible)"] = (pr["residual"]["masked"], pr["residual"]["visible"])
    ab = result.get("absorption", {})
    if "mean_absorption_fraction" in ab:
        out["absorption fraction (first letter)"] = ab["mean_absorption_fraction"]
        out["full absorption rate (first letter)"] = ab["mean_full_absorption"]
    return out


def run(args) -> dict:
    import torch

    from dlmscope.analysis.evaluate import EvaluateConfig, evaluate_sae_suite
    from dlmscope.data import heldout_rows
    from dlmscope.models import load_model

    torch.set_num_threads(args.threads)
    lm = load_model("dlmscope-tiny-dlm", device=args.device)
    rows = heldout_rows(lm.tokenizer, 128)
    cfg = EvaluateConfig(n_seqs=args.n_seqs, splice_seqs=args.splice_seqs, probe_examples=300)
    seeds = [int(v) for v in args.seed_list.split(",")]
    results = {"config": {"tokens": args.tokens, "seeds": len(seeds), "n_seqs": args.n_seqs,
                          "splice_seqs": args.splice_seqs, "layer": LAYER, "n_latents": args.expansion * lm.d_model,
                          "k": 32}, "runs": {}}
    for seed in seeds:
        t0 = time.time()
        saes = train_family(args, seed)
        results["config"][f"train_s_seed{seed}"] = round(time.time() - t0, 1)
        for arch, sae in saes.items():
            t0 = time.time()
            r = evaluate_sae_suite(lm, sae, rows, cfg)
            for big in ("rate_by_bin", "masked_share"):  # per-latent curves are large; the summary fractions stay
                r["t_curves"].pop(big)
            results["runs"].setdefault(arch, []).append(r)
            print(arch, seed, f"{time.time() - t0:.0f}s", flush=True)
    return results


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% Student-t interval over seeds."""
    from scipy.stats import t as student_t

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(student_t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def summary(results: dict) -> dict:
    """{architecture: {metric: [mean, 95% half-width] (or a list of such pairs, masked / visible)}}: the numbers the
    README quotes, written to sae_family_summary.json."""
    out: dict = {}
    for a in (a for a in ARCHS if a in results["runs"]):
        flat = [flatten(r) for r in results["runs"][a]]
        for m in dict.fromkeys(m for f in flat for m in f):
            vals = [f[m] for f in flat if m in f and f[m] is not None]
            if vals and isinstance(vals[0], (list, tuple)):
                out.setdefault(a, {})[m] = [list(interval([v[i] for v in vals])) for i in range(len(vals[0]))]
            elif vals:
                out.setdefault(a, {})[m] = list(interval(vals))
    return out


def render(results: dict, out: Path) -> str:
    from dlmscope.io_utils import atomic_write_json

    archs = [a for a in ARCHS if a in results["runs"]]
    flat = {a: [flatten(r) for r in results["runs"][a]] for a in archs}
    metrics = list(dict.fromkeys(m for a in archs for f in flat[a] for m in f))
    c = results["config"]
    lines = [f"dlmscope-tiny-dlm layer {c['layer']}, {c['n_latents']} latents, k = 32 (JumpReLU: L0 steered to 32), "
             f"{c['tokens']:,} training tokens, {c['seeds']} seeds; mean ± 95% t-interval half-width over seeds. "
             "The skip transcoder reads blocks.3.hook_mlp_in and predicts blocks.3.hook_mlp_out: its FVU and "
             "ΔCE are of the MLP output it replaces, not of the residual stream.", "",
             "| metric | " + " | ".join(archs) + " |", "|---" * (len(archs) + 1) + "|"]

    def cell(vals: list) -> str:
        if not vals:
            return "-"
        if isinstance(vals[0], (list, tuple)):
            return " / ".join(cell([v[i] for v in vals]) for i in range(len(vals[0])))
        if any(v is None for v in vals):
            return "-"
        mean, half = interval(vals)
        return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"

    for m in metrics:
        lines.append(f"| {m} | " + " | ".join(cell([f[m] for f in flat[a] if m in f]) for a in archs) + " |")
    table = "\n".join(lines)
    atomic_write_text(out / "sae_family.md", table + "\n")
    if results["config"]["seeds"] > 1:  # the merged run; one seed's partial file has no intervals
        atomic_write_json(out / "sae_family_summary.json", summary(results))
    return table


def merge(out: Path) -> None:
    """Combine per-seed results (sae_family.seed*.json, run as parallel processes) into sae_family.json."""
    import json

    from dlmscope.io_utils import atomic_write_json

    parts = [json.loads(f.read_text()) for f in sorted(out.glob("sae_family.seed*.json"))]
    merged = {"config": {**parts[0]["config"], "seeds": sum(p["config"]["seeds"] for p in parts)}, "runs": {}}
    for part in parts:
        merged["config"].update({k: v for k, v in part["config"].items() if k.startswith("train_s")})
        for arch, runs in part["runs"].items():
            merged["runs"].setdefault(arch, []).extend(runs)
    atomic_write_json(out / "sae_family.json", merged)
    print(render(merged, out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=600_000)
    p.add_argument("--seed-list", default="0,1", help="seeds to run; a subset writes sae_family.seed<list>.json")
    p.add_argument("--merge", action="store_true", help="combine the per-seed JSONs into sae_family.json")
    p.add_argument("--expansion", type=int, default=8, help="latents per model dimension")
    p.add_argument("--n-seqs", type=int, default=32)
    p.add_argument("--splice-seqs", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    known, _ = p.parse_known_args()
    if known.merge:
        return merge(RESULTS)
    name = "sae_family" if known.seed_list == "0,1" else f"sae_family.seed{known.seed_list.replace(',', '_')}"
    run_or_render(p, name, run, render)


if __name__ == "__main__":
    main()
