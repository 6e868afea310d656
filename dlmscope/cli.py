"""The `dlmscope` command line. Each command is a thin shell over the Python API."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, Literal, Optional, TypeAlias

import typer

from . import checks
from .cli_options import alias_command, dataclass_command, escape_markup, positional_or_option
from .errors import DLMScopeError
from .models.zoo import DEFAULT_AR_MODEL, DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mechanistic interpretability for diffusion language models.")

# Options several commands share: one flag name, one meaning, one type (tests/test_cli.py checks it).
ModelOpt = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model: a built-in name or a checkpoint folder.")
SaeModelOpt = typer.Option(None, "--model", "-m", help="Model: a built-in name or a checkpoint folder.",
                           show_default="the model the SAE records")
DeviceOpt = typer.Option("cpu", help="Torch device, e.g. cpu or cuda.",
                         callback=lambda value: checks.device("--device", value))
DtypeOpt = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16.")
ThresholdOpt = typer.Option(None, help="Fast-dLLM parallel decoding: reveal every masked position of the block with "
                                       "confidence >= this (0 < t <= 1; at least one per step; steps then unused).",
                            show_default="off")
KVCacheOpt = typer.Option(None, help="Fast-dLLM block KV cache: prefix or dual (native LLaDA / Dream only).",
                          show_default="off")
SamplerScheduleOpt = typer.Option(None, help="Sampler schedule (tokens revealed per step): linear (LLaDA) or dream "
                                  "(Dream's 1 - s/t).", show_default="the model family's own")
PromptOpt = typer.Option(["The list type"], "--prompt", "-p", help="Prompt text; repeat for a batch.")
ModelArg = typer.Argument(None, hidden=True, help="Deprecated: use --model.")
MaskIdOpt = typer.Option(None, help="Mask token id.", show_default="the folder's, else the family's released id")
PadIdOpt = typer.Option(None, help="Pad token id for left-padded prompts.",
                        show_default="the folder's, else the EOS id")
EosIdOpt = typer.Option(None, help="End-of-sequence id: texts end there.",
                        show_default="the folder's, else the family's released id")
EosStopOpt = typer.Option(False, help="Stop after the first block that leaves every generation free of masks and "
                          "holding an EOS (LLaDA 2.x's early stop).")


def _check_ids(**ids: Optional[int]) -> dict:
    """Token-id options, checked before any model loads."""
    from .models.ids import check_overrides

    check_overrides(**ids)
    return ids


def _choices(names: tuple[str, ...]) -> Any:
    """A CLI choice type over names a registry lists (typer shows and checks a Literal's values)."""
    return Literal.__getitem__(names)


if TYPE_CHECKING:  # the registries' names are known at run time only
    PolicyChoice: TypeAlias = str
    TaskChoice: TypeAlias = str
else:
    from .options import policy_names
    from .tasks import TASKS

    PolicyChoice = _choices(policy_names())
    TaskChoice = _choices((*TASKS, "none"))


SAMPLING_ALIASES = {"--cache": "--kv-cache", "--schedule": "--sampler-schedule"}
"""Spellings of older releases, read with a warning for one release."""


@app.command()
def info(model_arg: Optional[str] = ModelArg, model: Optional[str] = typer.Option(None, "--model", "-m",
         help="Model: a built-in name or a checkpoint folder.", show_default=DEFAULT_MODEL),
         device: str = DeviceOpt, dtype: str = DtypeOpt) -> None:
    """Family, size, mask id and hook names of a model."""
    from .models import load_model
    from .models.base import ROUTER_SITES, SITE_ORDER, parse_hook

    lm = load_model(positional_or_option(model_arg, model, "model", DEFAULT_MODEL), device=device, dtype=dtype)
    layers = lm.n_layers
    present = {parsed[1] for parsed in map(parse_hook, lm.hook_names) if parsed is not None}
    kinds = [k for k in SITE_ORDER if k in present and k not in ROUTER_SITES and not k.startswith("attn.")]
    summary = {
        "name": lm.name, "family": lm.family, "diffusion": lm.is_diffusion, "n_layers": layers,
        "d_model": lm.d_model, "vocab_size": lm.vocab_size, "mask_id": lm.mask_id, "pad_id": lm.pad_id,
        "eos_id": lm.eos_id, "shifted_logits": lm.shift,
        "parameters": lm.n_params(),
        "hook_names": f"blocks.{{0..{layers - 1}}}.hook_{{{','.join(kinds)}}}",
    }
    attn = [k[5:] for k in SITE_ORDER if k in present and k.startswith("attn.")]
    if attn:
        summary["attention_hook_names"] = f"blocks.{{0..{layers - 1}}}.attn.hook_{{{','.join(attn)}}}"
    if lm.n_experts:
        moe_layers = sorted({lm.layer_of(n) for n in lm.hook_names if n.endswith(".hook_router_logits")})
        summary.update({"experts": lm.n_experts, "active_experts": lm.n_active_experts, "moe_layers": moe_layers,
                        "router_hook_names": "blocks.{i}.hook_{router_logits,expert_weights,expert_indices}"})
    if lm.block_size:
        summary["block_size"] = lm.block_size
    typer.echo(json.dumps(summary, indent=2))


@app.command(cls=alias_command(SAMPLING_ALIASES))
def generate(
    model_arg: Optional[str] = ModelArg,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model: a built-in name or a checkpoint folder.",
                                        show_default=DEFAULT_MODEL),
    prompt: list[str] = PromptOpt,
    gen_length: int = typer.Option(32, help="Tokens to generate."),
    steps: int = typer.Option(32, help="Denoising steps (a multiple of the number of blocks)."),
    block_length: Optional[int] = typer.Option(
        None, help="Semi-autoregressive block length (divides gen-length).",
        show_default="32 when it divides gen-length, else gen-length (one block under the dream schedule)"),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    remasking: Optional[str] = typer.Option(None, help="low_confidence, random (LLaDA); maskgit_plus, topk_margin, "
                                            "entropy, origin (Dream).",
                                            show_default="the family's own: low_confidence; LLaDA 2.x its block "
                                            "sampler, its threshold 0.95 unless given"),
    cfg_scale: float = typer.Option(0.0, help="Classifier-free guidance scale (0 = off)."),
    sampler_schedule: Optional[str] = SamplerScheduleOpt,
    top_p: Optional[float] = typer.Option(None, help="Dream's nucleus filter in (0, 1].", show_default="off"),
    top_k: Optional[int] = typer.Option(None, help="Dream's top-k filter (0 = off).", show_default="off"),
    alg_temp: Optional[float] = typer.Option(None, help="Dream's alg_temp: draw positions from softmax(confidence / "
                                             "alg_temp) instead of taking the most confident (0 = off).",
                                             show_default="off"),
    eps: float = typer.Option(1e-3, help="Dream schedule's final time: t runs linspace(1, eps, steps + 1)."),
    seed: int = typer.Option(0, help="Random seed."),
    history: bool = typer.Option(False, help="Print the sequence after every step."),
    threshold: Optional[float] = ThresholdOpt,
    kv_cache: Optional[str] = KVCacheOpt,
    eos_early_stop: bool = EosStopOpt,
    mask_id: Optional[int] = MaskIdOpt,
    pad_id: Optional[int] = PadIdOpt,
    eos_id: Optional[int] = EosIdOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Generate text with the denoising sampler (each checkpoint family's own by default)."""
    from .diffusion.sampler import check_generate_options
    from .diffusion.sampler import generate as sample
    from .models import load_model

    check_generate_options(gen_length, steps, block_length, seed, threshold, temperature=temperature,
                           cfg_scale=cfg_scale, top_p=top_p, top_k=top_k, alg_temp=alg_temp, eps=eps)
    lm = load_model(positional_or_option(model_arg, model, "model", DEFAULT_MODEL), device=device, dtype=dtype,
                    **_check_ids(mask_id=mask_id, pad_id=pad_id, eos_id=eos_id))
    out = sample(lm, prompt, gen_length=gen_length, steps=steps, block_length=block_length, temperature=temperature,
                 remasking=remasking, cfg_scale=cfg_scale, schedule=sampler_schedule, top_p=top_p, top_k=top_k,
                 alg_temp=alg_temp, eps=eps, seed=seed, return_history=history, threshold=threshold, cache=kv_cache,
                 eos_early_stop=eos_early_stop)
    if history:
        for rec in out.history:
            for b in range(rec.x.shape[0]):
                shown = rec.x[b, out.prompt_length:].masked_fill(rec.mask[b, out.prompt_length:], -1).tolist()
                text = " ".join("_" if t < 0 else lm.to_text([t], skip_special=False) for t in shown)
                typer.echo(f"[step {rec.step:3d} | block {rec.block} | seq {b}] {text}")
    for p, text in zip(prompt, out.texts or [str(r.tolist()) for r in out.generated]):
        typer.echo(f"{p}{text}" if out.texts else f"{p} -> {text}")


@app.command("generate-blocks")
def generate_blocks_cmd(
    model_arg: Optional[str] = ModelArg,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model: a block-diffusion checkpoint folder "
                                        "(LLaDA 2.x).", show_default="required"),
    prompt: list[str] = PromptOpt,
    max_new_tokens: int = typer.Option(32, help="Tokens to generate (the last block is filled completely)."),
    steps_per_block: int = typer.Option(32, help="Most denoising steps per block (capped at max-new-tokens // "
                                        "minimal-topk)."),
    threshold: float = typer.Option(0.95, help="Reveal every position above this confidence when they fill the "
                                    "step's quota."),
    minimal_topk: int = typer.Option(1, help="Caps steps per block at max-new-tokens // minimal-topk."),
    block_length: Optional[int] = typer.Option(None, help="The model's block length for this run (attention follows "
                                               "it).", show_default="the model's block_size, 32 for released folders"),
    editing_threshold: Optional[float] = typer.Option(
        None, help="LLaDA 2.1's editing sampler: also rewrite placed tokens predicted otherwise with probability above "
        "this (steps-per-block and minimal-topk then unused; one new token per step below the threshold).",
        show_default="off: LLaDA 2.0's sampler"),
    max_post_steps: int = typer.Option(16, help="Editing sampler: most steps on a full block (they may still edit)."),
    eos_early_stop: bool = EosStopOpt,
    mask_id: Optional[int] = MaskIdOpt,
    eos_id: Optional[int] = EosIdOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Generate with LLaDA 2.x's block sampler (its own blocks, threshold decoding, cached finished blocks), or
    LLaDA 2.1's editing sampler with --editing-threshold."""
    from .diffusion.blocks import check_block_options, generate_blocks
    from .diffusion.editing import generate_editing
    from .models import load_model

    checks.number("--threshold", threshold, 0, 1)
    check_block_options(max_new_tokens, steps_per_block, threshold, minimal_topk)
    if editing_threshold is not None:
        checks.number("--editing-threshold", editing_threshold, 0, 1)
    checks.integer("--max-post-steps", max_post_steps, 0)
    if block_length is not None:
        checks.positive("--block-length", block_length)
    lm = load_model(_required_model(model_arg, model), device=device, dtype=dtype,
                    **_check_ids(mask_id=mask_id, eos_id=eos_id))
    if editing_threshold is None:
        out = generate_blocks(lm, prompt, max_new_tokens=max_new_tokens, steps_per_block=steps_per_block,
                              threshold=threshold, minimal_topk=minimal_topk, block_length=block_length,
                              eos_early_stop=eos_early_stop)
    else:
        out = generate_editing(lm, prompt, max_new_tokens=max_new_tokens, block_length=block_length,
                               threshold=threshold, editing_threshold=editing_threshold,
                               max_post_steps=max_post_steps, eos_early_stop=eos_early_stop)
    for p, text in zip(prompt, out.texts or [str(r.tolist()) for r in out.generated]):
        typer.echo(f"{p}{text}" if out.texts else f"{p} -> {text}")
    typer.echo(f"[{out.n_forwards} forwards, {out.generated.shape[1]} positions]")


def _required_model(positional: Optional[str], option: Optional[str]) -> str:
    model = positional_or_option(positional, option, "model")
    if model is None:
        raise DLMScopeError("give the model: --model CHECKPOINT")
    return model


def _train_sae(cfg) -> None:
    from .training import train_sae

    result = train_sae(cfg)
    if not result.interrupted:
        for key, m in result.metrics.items():
            typer.echo(f"{key}: FVU {m['fvu']:.4f}  L0 {m['l0']:.1f}  dead {m['dead_fraction']:.3f}  "
                       f"cosine {m['cosine']:.4f} -> {result.saes[key]}")
        typer.echo(f"run folder: {result.folder} (report.html, metrics.json)")
    else:  # checkpointed and stopped: exit like a shell does on the signal (130 SIGINT, 143 SIGTERM)
        sys.exit(128 + result.signal)


def _register_train_sae() -> None:
    from .training import TrainSAEConfig

    dataclass_command(app, TrainSAEConfig, _train_sae, "train-sae",
                      "Train SAEs or transcoders (any registered architecture; one per layer and k) on a model's "
                      "residual stream or MLP sites, from the model or an activation cache.",
                      aliases={"--cache": "--activation-cache"})


_register_train_sae()


def _rspo(cfg) -> None:
    from .rl import train_rl

    log = train_rl(cfg)
    if log.get("interrupted"):
        sys.exit(128 + log["signal"])
    typer.echo(f"{cfg.algo} on {cfg.task}: test accuracy {log['before']['accuracy']:.3f} -> {log['after']['accuracy']:.3f}, "
               f"reward {log['before']['reward']:.3f} -> {log['after']['reward']:.3f}; checkpoints in {cfg.out}")


def _register_rspo() -> None:
    from .rl import RLConfig

    dataclass_command(app, RLConfig, _rspo, "rspo", "RL post-training of a DLM on a verifiable task (RSPO, SPG or "
                      "diffu-GRPO; optional LoRA).", aliases={"--steps": "--rl-steps", **SAMPLING_ALIASES})


_register_rspo()


def _diff(cfg) -> None:
    from .analysis.diffing import diff

    report = diff(cfg)
    if report.get("interrupted"):
        sys.exit(128 + report["signal"])
    for key, r in report["crosscoders"].items():
        for e in r["per_checkpoint"]:
            later, base = e["specific_later"], e["specific_base"]
            typer.echo(f"{key} {e['checkpoint']}: {r['n_alive']} alive latents, {later['count']} specific to it "
                       f"({later['robust']} robust by Latent Scaling), {base['count']} specific to the base "
                       f"({base['robust']} robust), {e['shared']} shared; FVU {r['fvu']:.4f}")
            if "null_test" in e:
                t = e["null_test"]
                typer.echo(f"  against base vs base: KS D {t['ks_statistic']:.3f} (p {t['ks_pvalue']:.3g}), spread "
                           f"mean|r - 0.5| {t['spread']:.4f} vs {t['spread_null']:.4f} (permutation p "
                           f"{t['spread_pvalue']:.3g})")
    for key, r in report["diff_saes"].items():
        typer.echo(f"{key}: |difference|^2 / |base|^2 = {r['relative_difference_norm_sq']:.4f}, diff-SAE FVU {r['fvu']:.4f}")
    typer.echo(f"report: {report['folder']}/diff.json, diff.html (explorer: DLMSCOPE_DIFF={report['folder']}/diff.json streamlit run apps/explorer.py)")


def _register_diff() -> None:
    from .training import DiffConfig

    dataclass_command(app, DiffConfig, _diff, "diff", "Model diffing: a BatchTopK crosscoder over paired activations "
                      "of checkpoints (relative decoder norms, Latent Scaling), optionally a diff-SAE.",
                      aliases={"--cache": "--activation-cache", "--threshold": "--specific-threshold"})


_register_diff()


def _patch(cfg) -> None:
    from .analysis.patching import patch

    report = patch(cfg)
    if "sweep" in report:
        r = report["sweep"]
        typer.echo(f"{r['kind']} sweep, {report['metric']} at position {report['target']}: clean {r['clean']:.4f}, "
                   f"corrupted {r['corrupted']:.4f}; {r['forwards']} forwards, {r['sequences']} sequences")
        cells = sorted(((abs(v), v, a, b) for a, row in zip(r["rows"], r["normalised"]) for b, v in zip(r["cols"], row)
                        if v == v), reverse=True)[:5]
        for _, v, a, b in cells:
            typer.echo(f"  {r['row_name']} {a}, {r['col_name']} {b}: restored {v:+.3f}")
        if r.get("agreement"):
            g = r["agreement"]
            typer.echo(f"attribution patching vs exact: pearson {g['pearson']:.3f}, sign agreement "
                       f"{g['sign_agreement']:.3f}, top-{g['top']} overlap {g['top_overlap']:.2f}")
    else:
        typer.echo(f"{report['metric']} at position {report['target']}: clean {report['clean_metric']:.4f}, "
                   f"corrupted {report['corrupted_metric']:.4f}")
        for p in report["patches"]:
            restored = "n/a" if p["normalised"] is None else f"{p['normalised']:+.3f}"
            typer.echo(f"  {p['patch']}: {p['metric']:.4f} (restored {restored})")
    for f in report.get("files", []):
        typer.echo(f"wrote {f}")


def _register_patch() -> None:
    from .analysis.patching import PatchConfig

    dataclass_command(app, PatchConfig, _patch, "patch", "Activation patching: clean activations into a corrupted "
                      "input across layers, positions, heads and denoising steps (one forward or the sampler).")


_register_patch()


SaeOpt = typer.Option(..., help="SAE: a registry name or a folder.")


@app.command("eval-splice")
def eval_splice(
    sae: str = SaeOpt,
    model: Optional[str] = SaeModelOpt,
    t_bins: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="Comma-separated mask ratios."),
    positions: str = typer.Option("all", help="Splice at all, masked or visible positions."),
    with_error: bool = typer.Option(False, help="Add the reconstruction error back."),
    n_seqs: int = typer.Option(64, help="Held-out sequences per bin."),
    context_length: int = typer.Option(128, help="Tokens per sequence."),
    out: Optional[str] = typer.Option(None, help="Output JSON file of the result.", show_default="not written"),
    seed: int = typer.Option(0, help="Mask seed."),
    device: str = DeviceOpt,
) -> None:
    """Cross-entropy impact of splicing an SAE into the model (DLM: per mask-ratio bin)."""
    from .analysis.splice import SpliceConfig, check_sae_model, splice_eval, splice_table
    from .data import heldout_rows
    from .diffusion.sampler import check_context_length
    from .io_utils import atomic_write_json
    from .models import load_model
    from .sae import load_sae

    cfg = SpliceConfig(tuple(checks.float_list("--t-bins", t_bins, 0.0, 1.0, low_open=True)), positions, with_error,
                       n_seqs, seed=seed)
    checks.positive("--context-length", context_length)
    if out:
        checks.result_file("--out", out, ("hook", "config", "bins"))
    the_sae = load_sae(sae, device=device)
    model = model or the_sae.cfg.model_name or DEFAULT_MODEL
    check_sae_model(the_sae, model)  # before the model loads
    lm = load_model(model, device=device)
    check_context_length(lm, context_length, "--context-length")
    result = splice_eval(lm, the_sae, heldout_rows(lm.tokenizer, context_length), cfg)
    typer.echo(splice_table(result))
    if out:
        atomic_write_json(out, result)


@app.command("evaluate")
def evaluate_cmd(
    sae_arg: Optional[str] = typer.Argument(None, hidden=True, help="Deprecated: use --sae."),
    sae: Optional[str] = typer.Option(None, help="SAE: a registry name or a folder.", show_default="required"),
    model: Optional[str] = SaeModelOpt,
    out: Optional[str] = typer.Option(None, help="Output folder for evaluation.json / .html.",
                                      show_default="eval-<SAE name>"),
    n_seqs: int = typer.Option(64, help="Held-out sequences for core metrics and t-curves."),
    t_bins: str = typer.Option("0.1,0.3,0.5,0.7,0.9", help="Comma-separated mask ratios."),
    n_draws: int = typer.Option(3, help="Independent mask draws per bin (FVU per draw with a t-interval)."),
    splice_seqs: int = typer.Option(32, help="Sequences per bin for ΔCE / ΔELBO (0 skips splicing)."),
    probes: str = typer.Option("token_class,sudoku_digit,countdown_op", help="Label sets for sparse probing ('' skips)."),
    probe_k: str = typer.Option("1,2,5,20", help="Comma-separated latents per sparse probe."),
    absorption: bool = typer.Option(True, help="Run the first-letter absorption metric."),
    context_length: int = typer.Option(128, help="Tokens per held-out sequence."),
    seed: int = typer.Option(0, help="Mask and split seed."),
    device: str = DeviceOpt,
) -> None:
    """SAEBench-style evaluation for DLMs: core metrics per mask ratio and masked vs visible, t-curves, sparse probing, absorption."""
    from pathlib import Path

    from .analysis.evaluate import EvaluateConfig, evaluate_sae_suite, summary_rows, write_report
    from .data import heldout_rows
    from .diffusion.sampler import check_context_length
    from .models import load_model
    from .sae import load_sae

    try:
        cfg = EvaluateConfig(n_seqs=n_seqs, t_bins=tuple(float(v) for v in t_bins.split(",") if v.strip()),
                             splice_seqs=splice_seqs, probes=tuple(p.strip() for p in probes.split(",") if p.strip()),
                             probe_k=tuple(int(v) for v in probe_k.split(",") if v.strip()), absorption=absorption,
                             seed=seed, n_draws=n_draws)
    except ValueError as e:
        if isinstance(e, DLMScopeError):
            raise
        raise DLMScopeError(f"t-bins={t_bins!r} and probe-k={probe_k!r} must be comma-separated numbers") from None
    sae = positional_or_option(sae_arg, sae, "sae")
    if sae is None:
        raise DLMScopeError("give the SAE: --sae NAME_OR_FOLDER")
    checks.positive("--context-length", context_length)
    out_dir = checks.writable_folder("--out", out or f"eval-{Path(sae).name}")  # before the evaluation runs
    sae_obj = load_sae(sae, device=device)
    lm = load_model(model or sae_obj.cfg.model_name or DEFAULT_MODEL, device=device)
    check_context_length(lm, context_length, "--context-length")
    result = evaluate_sae_suite(lm, sae_obj, heldout_rows(lm.tokenizer, context_length), cfg)
    path = write_report(result, out_dir)
    typer.echo("| t | FVU masked | FVU visible | L0 masked | L0 visible | ΔCE (all positions) |\n|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in summary_rows(result):
        typer.echo(f"| {r['t']:g} | {fmt(r['fvu_masked'])} | {fmt(r['fvu_visible'])} | {fmt(r['l0_masked'])} | "
                   f"{fmt(r['l0_visible'])} | {fmt(r['delta_ce'])} |")
    typer.echo(f"written {path} and {path.with_suffix('.html')}")


@app.command("cache", cls=alias_command({"--dtype": "--store-dtype"}))
def cache_cmd(
    out_arg: Optional[str] = typer.Argument(None, hidden=True, help="Deprecated: use --out."),
    out: Optional[str] = typer.Option(None, help="Output folder of the cache (resumable: complete shards are kept).",
                                      show_default="required"),
    model: str = ModelOpt,
    layers: str = typer.Option("1,3", help="Comma-separated layers (resid_post)."),
    policy: Optional[PolicyChoice] = typer.Option(None, help="Positions whose activations are cached: mask, "
                                                      "unmask, all or clean.",
                                                      show_default="mask for DLMs, clean for causal models"),
    t_min: float = typer.Option(0.05, help="Lowest mask ratio."),
    t_max: float = typer.Option(0.5, help="Highest mask ratio."),
    batches: int = typer.Option(0, help="Forward batches to cache (0 = one pass over the data)."),
    seqs_per_forward: int = typer.Option(32, help="Rows per forward."),
    context_length: int = typer.Option(128, help="Tokens per row."),
    dataset: str = typer.Option("builtin", help="Text source."),
    store_dtype: str = typer.Option("float32", help="Dtype the activations are stored in: float32, bfloat16 or "
                                    "float16 (the model runs in float32)."),
    seed: int = typer.Option(0, help="Seed for order and masks."),
    device: str = DeviceOpt,
) -> None:
    """Write activations to sharded safetensors with a checksummed manifest."""
    from .activations import POLICIES, ActivationSource, read_manifest, write_cache
    from .data import load_texts, pack
    from .diffusion.sampler import check_context_length
    from .models import load_model
    from .models.checkpoint import DTYPES, resolve_dtype

    out = positional_or_option(out_arg, out, "out")
    if out is None:
        raise DLMScopeError("give the cache folder: --out FOLDER")
    manifest = checks.writable_folder("--out", out) / "manifest.json"
    if manifest.is_file():
        read_manifest(manifest)  # resuming: a damaged manifest fails before the model loads
    hooks = [f"blocks.{i}.hook_resid_post" for i in checks.int_list("--layers", layers, 0)]
    if policy is not None:
        checks.choice("--policy", policy, POLICIES)
    checks.number("--t-min", t_min, 0.0, 1.0)
    checks.number("--t-max", t_max, t_min, 1.0)
    checks.non_negative("--batches", batches)
    checks.positive("--seqs-per-forward", seqs_per_forward)
    checks.positive("--context-length", context_length)
    checks.seed("--seed", seed)
    resolve_dtype(store_dtype)  # one line for an unknown name
    texts = load_texts(dataset)  # a bad dataset fails before the model loads
    lm = load_model(model, device=device)
    check_context_length(lm, context_length, "--context-length")
    rows = pack(lm.tokenizer, texts, context_length)
    src = ActivationSource(lm, hooks, rows.input_ids, rows.doc_ids, policy=policy, t_range=(t_min, t_max),
                           seqs_per_batch=seqs_per_forward, seed=seed)
    folder = write_cache(src, out, batches or None, dtype=DTYPES[store_dtype])
    typer.echo(f"cache written to {folder}")


@app.command(cls=alias_command({"--schedule": "--steer-steps", "--cache": "--kv-cache"}))
def steer(
    sae: str = SaeOpt,
    feature: int = typer.Option(..., help="Latent index to push."),
    model: Optional[str] = SaeModelOpt,
    prompt: list[str] = PromptOpt,
    strength: float = typer.Option(2.0, help="Added strength * max(A) (scale max) or strength (scale fixed)."),
    mode: str = typer.Option("sae", help="sae (edit latent, keep error) or direction (add W_dec[f])."),
    scale: str = typer.Option("max", help="max or fixed."),
    steer_steps: str = typer.Option("all", help="Denoising steps that are steered: all, first:FRACTION, or "
                                    "comma-separated steps (formerly --schedule, deprecated)."),
    positions: str = typer.Option("all", help="Positions that are steered: all, masked, generated or top:N."),
    gen_length: int = typer.Option(32, help="Tokens to generate."),
    steps: int = typer.Option(32, help="Denoising steps (DLMs)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (0 = greedy)."),
    sampler_schedule: Optional[str] = SamplerScheduleOpt,
    seeds: str = typer.Option("0", help="Comma-separated seeds."),
    metrics: bool = typer.Option(True, help="Score both with the feature, the AR judge's perplexity and the DLM "
                                 "judge's ELBO."),
    ar_judge: str = typer.Option(DEFAULT_AR_MODEL, help="Autoregressive model whose perplexity scores fluency."),
    dlm_judge: str = typer.Option(DEFAULT_MODEL, help="Diffusion model whose ELBO (NLL per token) scores the texts."),
    out: Optional[str] = typer.Option(None, help="Output JSON file of the comparison.", show_default="not written"),
    threshold: Optional[float] = ThresholdOpt,
    kv_cache: Optional[str] = KVCacheOpt,
    device: str = DeviceOpt,
) -> None:
    """Generate with and without feature steering, side by side (DLM sampler or AR decoding)."""
    from .analysis.steering import SteeringSpec, compare, validate
    from .diffusion.remasking import check_threshold
    from .diffusion.schedules import get_schedule
    from .diffusion.stepforward import check_fast_options
    from .io_utils import atomic_write_json
    from .models import load_model
    from .sae import load_sae

    sched = steer_steps if steer_steps == "all" or steer_steps.startswith("first:") else \
        checks.int_list("--steer-steps", steer_steps, 0)
    seed_list = [checks.seed("--seeds", s_) for s_ in checks.int_list("--seeds", seeds)]
    checks.non_negative("--feature", feature)
    checks.positive("--gen-length", gen_length)
    checks.positive("--steps", steps)
    checks.number("--temperature", temperature, 0)
    check_threshold(threshold)
    if out:
        checks.result_file("--out", out, ("feature", "steered", "unsteered"))
    if sampler_schedule is not None:
        get_schedule(sampler_schedule)  # bad names fail before anything loads
    the_sae = load_sae(sae, device=device)
    lm = load_model(model or the_sae.cfg.model_name or DEFAULT_MODEL, device=device)
    spec = SteeringSpec(feature, strength, mode, scale, sched, positions)
    check_fast_options(lm, threshold, kv_cache)
    validate(spec, the_sae, lm, gen_length if lm.causal else steps)  # before the judges load: bad input fails fast
    judge = (lambda name: lm if lm.name == name else load_model(name, device=device)) if metrics else (lambda name: None)
    r = compare(lm, the_sae, spec, prompt, seed_list, None if metrics else {}, judge(ar_judge), judge(dlm_judge),
                gen_length, steps, temperature, sampler_schedule, threshold, kv_cache)
    for p, b, s_ in zip(r["prompts"], r["unsteered_texts"], r["steered_texts"]):
        typer.echo(f"prompt   : {p}\nunsteered: {p}{b}\nsteered  : {p}{s_}\n")
    if metrics:
        typer.echo("| | feature act. | concept rate (output) | concept rate (logit) | AR perplexity | DLM NLL/token |\n"
                   "|---|---|---|---|---|---|")
        for label in ("unsteered", "steered"):
            m = r[label]
            typer.echo(f"| {label} | {m['feature_activation']:.4f} | {m['concept_rate']['output']:.3f} | "
                       f"{m['concept_rate']['logit']:.3f} | {m['perplexity']:.1f} | {m['dlm_nll']:.3f} |")
    if out:
        atomic_write_json(out, r)


@app.command(cls=alias_command({"--steps": "--step-budgets", **SAMPLING_ALIASES}))
def order(
    sae: str = typer.Option(..., help="SAEs: registry names or folders, comma-separated (one per layer)."),
    model: Optional[str] = SaeModelOpt,
    prompt: list[str] = typer.Option(["The list type", "A dictionary is"], "--prompt", "-p",
                                     help="Prompt text; repeat for a batch."),
    strategies: str = typer.Option("origin,low_confidence,topk_margin,entropy,sae_stability", help="Remasking orders."),
    task: TaskChoice = typer.Option("sudoku", help="Verifiable task whose accuracy is measured (none skips it)."),
    n: int = typer.Option(50, help="Task examples."),
    step_budgets: str = typer.Option("4,8,16", help="Comma-separated denoising-step budgets for the task and "
                                     "held-out likelihood."),
    gen_length: int = typer.Option(16, help="Tokens to generate."),
    heldout: int = typer.Option(32, help="Held-out rows for the order-following likelihood (0 to skip)."),
    sampler_schedule: Optional[str] = SamplerScheduleOpt,
    out: Optional[str] = typer.Option(None, help="Output JSON file of the result.", show_default="not written"),
    threshold: Optional[float] = ThresholdOpt,
    kv_cache: Optional[str] = KVCacheOpt,
    device: str = DeviceOpt,
) -> None:
    """Feature dynamics per remasking order, task accuracy and held-out likelihood, incl. the SAE-informed order."""
    from .analysis.order import order_header, order_study, strategy_names
    from .data import heldout_rows
    from .diffusion.remasking import check_threshold
    from .diffusion.schedules import get_schedule
    from .diffusion.stepforward import check_fast_options
    from .io_utils import atomic_write_json
    from .models import load_model
    from .sae import load_sae

    sae_names = checks.names("--sae", sae)
    names = [checks.choice("--strategies", s, strategy_names()) for s in checks.names("--strategies", strategies)]
    task_name = None if task == "none" else task
    if task_name:
        checks.positive("--n", n)
    checks.positive("--gen-length", gen_length)
    budgets = checks.int_list("--step-budgets", step_budgets, 1, gen_length)
    checks.non_negative("--heldout", heldout)
    check_threshold(threshold)
    if out:
        checks.result_file("--out", out, ("dynamics", "task", "heldout_nll"))
    if sampler_schedule is not None:
        get_schedule(sampler_schedule)  # bad names fail before anything loads
    saes = [load_sae(s, device=device) for s in sae_names]
    lm = load_model(model or saes[-1].cfg.model_name or DEFAULT_MODEL, device=device)
    check_fast_options(lm, threshold, kv_cache)
    rows = heldout_rows(lm.tokenizer, 2 * gen_length, heldout) if heldout else None
    typer.echo(order_header(lm, saes, task_name, budgets, bool(heldout)))
    result = order_study(lm, saes, prompt, names, task_name, n, budgets, gen_length, rows, sampler_schedule,
                         threshold, kv_cache, on_row=lambda name, row: typer.echo(row))
    if out:
        atomic_write_json(out, result)


@app.command()
def stability(
    sae: str = typer.Option(..., help="SAE trained on the first checkpoint: a registry name or a folder."),
    checkpoints: str = typer.Option(..., help="Comma-separated checkpoints; the first is the SAE's own."),
    saes: Optional[str] = typer.Option(None, help="Comma-separated SAEs, one per checkpoint, for decoder matching.",
                                       show_default="none"),
    control_sae: Optional[str] = typer.Option(None, help="Second SAE on the first checkpoint (other seed): the "
                                              "matching floor.", show_default="none"),
    n_seqs: int = typer.Option(32, help="Held-out sequences."),
    out: str = typer.Option("stability", help="Output folder for report.json and report.html."),
    device: str = DeviceOpt,
) -> None:
    """How stable an SAE's features are across checkpoints (e.g. before and after RL)."""
    from pathlib import Path

    from .analysis.stability import stability_report, stability_table, write_report_html
    from .data import heldout_rows
    from .io_utils import atomic_write_json
    from .models import load_model
    from .sae import load_sae

    ckpt_names = checks.names("--checkpoints", checkpoints)
    if len(ckpt_names) < 2:
        raise DLMScopeError(f"--checkpoints={checkpoints!r} names {len(ckpt_names)} checkpoint; give at least two: "
                            "the SAE's own and a later one")
    sae_names = checks.names("--saes", saes) if saes and saes.strip() else []
    if sae_names and len(sae_names) != len(ckpt_names):
        raise DLMScopeError(f"--saes lists {len(sae_names)} SAEs for {len(ckpt_names)} checkpoints; give one per "
                            "checkpoint or none")
    checks.positive("--n-seqs", n_seqs)
    checks.writable_folder("--out", out)
    checks.result_file("--out", Path(out) / "report.json", ("hook", "policy", "checkpoints"))  # never a user's file
    lms = [load_model(c, device=device) for c in ckpt_names]
    per = [load_sae(s_, device=device) for s_ in sae_names]
    control = load_sae(control_sae, device=device) if control_sae else None
    report = stability_report(load_sae(sae, device=device), lms, heldout_rows(lms[0].tokenizer, 128),
                              saes_per_checkpoint=per or None, control_sae=control, n_seqs=n_seqs)
    typer.echo(stability_table(report))
    atomic_write_json(Path(out) / "report.json", report)
    write_report_html(report, Path(out) / "report.html")


@app.command()
def experts(
    model_arg: Optional[str] = ModelArg,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model: an MoE checkpoint folder (LLaDA-MoE or "
                                        "LLaDA 2.x).", show_default="required"),
    prompt: list[str] = PromptOpt,
    gen_length: int = typer.Option(32, help="Tokens to generate."),
    steps: int = typer.Option(32, help="Denoising steps."),
    block_length: Optional[int] = typer.Option(None, help="Semi-autoregressive block length.",
                                               show_default="one block"),
    layer: Optional[int] = typer.Option(None, help="MoE layer to plot.", show_default="the first"),
    seed: int = typer.Option(0, help="Random seed."),
    out: str = typer.Option("experts", help="Output folder for experts.json and experts.html."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Expert routing across denoising steps: usage on masked vs visible positions, change at unmasking."""
    from .analysis.experts import check_layer, expert_dynamics, write_expert_report
    from .diffusion.sampler import check_generate_options
    from .models import load_model

    check_generate_options(gen_length, steps, block_length, seed)
    if layer is not None:
        checks.non_negative("--layer", layer)
    checks.writable_folder("--out", out)
    lm = load_model(_required_model(model_arg, model), device=device, dtype=dtype)
    check_layer(lm, layer)
    result = expert_dynamics(lm, prompt, gen_length=gen_length, steps=steps, block_length=block_length, seed=seed)
    json_path, html = write_expert_report(result, out, layer)
    for i, d in result["layers"].items():
        typer.echo(f"layer {i}: TV(masked, visible) {d['masked_vs_visible_tv']:.3f}  "
                   f"overlap across unmasking {d['unmask_overlap']:.3f}")
    typer.echo(f"wrote {json_path} and {html}")


features_app = typer.Typer(help="Feature statistics for the explorer.", no_args_is_help=True)
app.add_typer(features_app, name="features")
DEFAULT_SAE = "tiny-dlm-L3-k32"


def _register_attribute() -> None:
    """`dlmscope attribute --model M -p PROMPT --position P`: flags from `AttributeConfig` (its field docs are the
    help; --model, --prompt/-p and --device as every other command spells them)."""
    from .analysis.attribution import AttributeConfig, attribute_run
    from .cli_options import field_docs

    doc = field_docs(AttributeConfig)
    d = AttributeConfig.__dataclass_fields__

    def opt(name: str, *decls: str):
        return typer.Option(d[name].default, *decls, help=doc[name])

    @app.command("attribute", help=AttributeConfig.__doc__)
    def attribute_cmd(
        model: str = ModelOpt, transcoders: str = opt("transcoders"),
        prompt: list[str] = typer.Option([d["prompt"].default], "--prompt", "-p", help=doc["prompt"]),
        position: int = opt("position"), step: int = opt("step"),
        reveal_step: bool = opt("reveal_step", "--reveal-step/--no-reveal-step"), token: int = opt("token"),
        contrast: int = opt("contrast"), links: int = opt("links"), gen_length: int = opt("gen_length"),
        steps: int = opt("steps"), block_length: int = opt("block_length"), remasking: str = opt("remasking"),
        node_threshold: float = opt("node_threshold"), edge_threshold: float = opt("edge_threshold"),
        backward_batch: int = opt("backward_batch"), max_feature_nodes: int = opt("max_feature_nodes"),
        out: str = opt("out"), device: str = DeviceOpt,
    ) -> None:
        if len(prompt) != 1:
            raise DLMScopeError(f"attribute traces one prompt; got {len(prompt)} (give -p once)")
        values = {k: v for k, v in locals().items() if k in d}
        cfg = AttributeConfig(**{**values, "prompt": prompt[0]})
        res = attribute_run(cfg)
        for g in res["graphs"]:
            m = g["metadata"]
            n_feat = sum(v["feature_type"] == "cross layer transcoder" for v in g["nodes"])
            typer.echo(f"step {m['step']} position {m['target_position']}: {len(g['nodes'])} nodes ({n_feat} features), "
                       f"{len(g['links'])} edges, target {m['target_value']:.3f}, {m['backward_passes']} backward passes")
        typer.echo(f"text: {res['text']!r}\nwrote {cfg.out}/attribution.json, attribution.html")


_register_attribute()


def _default_store(model: str, sae: str):
    from pathlib import Path

    from .data import cache_dir

    return cache_dir() / "stores" / f"{Path(model).name}__{Path(sae).name}"


def _build_store(sae_name: str, model: Optional[str], out: Optional[str], cfg, device: str):
    """Load the SAE and its model (the one recorded in the SAE unless given), build the store; its folder."""
    import time
    from pathlib import Path

    from .analysis.features import build_feature_store, check_store_target
    from .data import heldout_rows
    from .diffusion.sampler import check_context_length
    from .models import load_model
    from .sae import load_sae

    if out is not None:
        check_store_target(out)  # before any loading: refuse a file or a folder that is not a store
    sae = load_sae(sae_name, device=device)
    model = model or sae.cfg.model_name or DEFAULT_MODEL
    lm = load_model(model, device=device)
    check_context_length(lm, cfg.context_length)
    ref = lambda name: str(Path(name).resolve()) if Path(name).expanduser().is_dir() else name  # noqa: E731
    t0 = time.perf_counter()
    folder = build_feature_store(lm, sae, heldout_rows(lm.tokenizer, cfg.context_length),
                                 out or _default_store(lm.name, sae_name), cfg, sae_name=ref(sae_name),
                                 model_ref=ref(model))
    typer.echo(f"feature store for {sae_name} on {lm.name} written to {folder} in {time.perf_counter() - t0:.1f} s")
    return folder


@features_app.command("build", cls=alias_command({"--t-low": "--t-min", "--t-high": "--t-max",
                                                  "--batch-size": "--seqs-per-forward"}))
def features_build(
    sae: str = typer.Option(DEFAULT_SAE, help="SAE: a registry name or a folder."),
    model: Optional[str] = SaeModelOpt,
    out: Optional[str] = typer.Option(None, help="Output folder of the feature store.",
                                      show_default="~/.cache/dlmscope/stores/<model>__<sae>"),
    n_seqs: Optional[int] = typer.Option(None, help="Held-out sequences to encode.", show_default="all"),
    context_length: int = typer.Option(128, help="Tokens per sequence."),
    seqs_per_forward: int = typer.Option(16, help="Rows per model forward."),
    t_min: float = typer.Option(0.05, help="Lowest mask ratio."),
    t_max: float = typer.Option(0.5, help="Highest mask ratio."),
    seed: int = typer.Option(0, help="Seed of the mask draws."),
    device: str = DeviceOpt,
) -> None:
    """Precompute per-feature statistics, examples, histograms and logit effects into a store."""
    from .analysis.features import FeatureStoreConfig

    checks.positive("--seqs-per-forward", seqs_per_forward)  # by their flag names: the config's fields differ
    checks.number("--t-min", t_min, 0.0, 1.0)
    checks.number("--t-max", t_max, t_min, 1.0)
    cfg = FeatureStoreConfig(n_seqs=n_seqs, context_length=context_length, batch_size=seqs_per_forward, t_low=t_min,
                             t_high=t_max, seed=seed)
    _build_store(sae, model, out, cfg, device)


@app.command()
def explore(
    sae: str = typer.Option(DEFAULT_SAE, help="SAE: a registry name or a folder."),
    model: Optional[str] = SaeModelOpt,
    store: Optional[str] = typer.Option(None, help="Feature store folder (built on first launch if missing).",
                                        show_default="~/.cache/dlmscope/stores/<model>__<sae>"),
    splice: Optional[str] = typer.Option(None, help="Splice JSON for the summary page.",
                                         show_default="<store>/splice.json"),
    circuits: Optional[str] = typer.Option(None, help="Patching result for the Circuits page: `dlmscope patch --out`'s "
                                           "patch.json or experiments/results/circuits_sudoku.json.",
                                           show_default="<store>/circuits.json"),
    port: int = typer.Option(8501, help="Port for the Streamlit server."),
    address: str = typer.Option("127.0.0.1", help="Address the server listens on."),
    device: str = DeviceOpt,
) -> None:
    """Launch the Streamlit feature explorer (builds the feature store first when it is missing or outdated)."""
    import subprocess
    from pathlib import Path

    from .analysis.features import FeatureStore, FeatureStoreConfig

    checks.integer("--port", port, 1, 65535)
    if store is None:
        from .sae import load_sae

        store = str(_default_store(model or load_sae(sae).cfg.model_name or DEFAULT_MODEL, sae))
    try:
        FeatureStore.open(store)
    except DLMScopeError:
        if Path(store).exists() and any(Path(store).iterdir()) and not (Path(store) / "manifest.json").is_file():
            raise DLMScopeError(f"--store {store!r} is a non-empty folder that is not a feature store") from None
        _build_store(sae, model, store, FeatureStoreConfig(), device)
    app_file = Path(__file__).with_name("explorer.py")
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_file), "--server.port", str(port), "--server.address",
           address, "--server.headless", "true", "--browser.gatherUsageStats", "false", "--", "--store", store,
           "--sae", sae] + (["--model", model] if model else []) + (["--splice", splice] if splice else []) \
        + (["--circuits", circuits] if circuits else [])
    sys.exit(subprocess.call(cmd))


def _guard_numbers(typer_app: typer.Typer) -> None:
    """Wrap every command (sub-apps included) so NaN / inf floats and integers beyond 64 bits fail in one line
    before the command body runs; each command's (or config's) own checks then judge the range."""
    import functools
    import inspect

    for info in typer_app.registered_commands:
        fn = info.callback
        if fn is None or getattr(fn, "_numbers_guarded", False):
            continue
        flags = {name: next((d for d in getattr(p.default, "param_decls", ()) or () if d.startswith("--")),
                            f"--{name.replace('_', '-')}").split("/")[0]
                 for name, p in inspect.signature(fn).parameters.items()}

        @functools.wraps(fn)
        def guarded(*args, _fn=fn, _flags=flags, **kwargs):
            checks.finite_values(kwargs, _flags)
            return _fn(*args, **kwargs)

        setattr(guarded, "_numbers_guarded", True)
        info.callback = guarded
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _guard_numbers(group.typer_instance)


def command():
    """The click command tree of `app`, its help texts escaped for Rich (they are plain text)."""
    cmd = typer.main.get_command(app)
    escape_markup(cmd)
    return cmd


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2."""
    _guard_numbers(app)
    try:
        command().main(args=argv, standalone_mode=False, prog_name="dlmscope")
    except DLMScopeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        message = getattr(e, "format_message", None)
        if not isinstance(e, _usage_errors()) or message is None:
            raise
        typer.echo(f"error: {message()} (see --help)", err=True)
        sys.exit(2)


def _usage_errors() -> tuple[type, ...]:
    """Click's exception base: recent typer vendors click as `typer._click`, older ones use `click`."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except ImportError:
            pass
    return tuple(found)


if __name__ == "__main__":
    main()
