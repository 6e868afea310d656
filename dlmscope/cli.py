"""The `dlmscope` command line. Each command is a thin shell over the Python API."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from .errors import DLMScopeError
from .models.zoo import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mechanistic interpretability for diffusion language models.")

ModelOpt = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Built-in model name or local checkpoint folder.")
DeviceOpt = typer.Option("cpu", help="Torch device, e.g. cpu or cuda.")
DtypeOpt = typer.Option("float32", help="float32, bfloat16 or float16.")


@app.command()
def info(model: str = typer.Argument(DEFAULT_MODEL, help="Built-in model name or checkpoint folder."),
         device: str = DeviceOpt, dtype: str = DtypeOpt) -> None:
    """Family, size, mask id and hook names of a model."""
    from .models import load_model
    from .models.base import HOOK_KINDS

    lm = load_model(model, device=device, dtype=dtype)
    layers = lm.n_layers
    summary = {
        "name": lm.name, "family": lm.family, "diffusion": lm.is_diffusion, "n_layers": layers,
        "d_model": lm.d_model, "vocab_size": lm.vocab_size, "mask_id": lm.mask_id, "shifted_logits": lm.shift,
        "parameters": lm.n_params(),
        "hook_names": f"blocks.{{0..{layers - 1}}}.hook_{{{','.join(k for k in HOOK_KINDS if any(n.endswith(k) for n in lm.hook_names))}}}",
    }
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def generate(
    model: str = typer.Argument(DEFAULT_MODEL, help="Built-in model name or checkpoint folder."),
    prompt: list[str] = typer.Option(["The list type"], "--prompt", "-p", help="Prompt text; repeat for a batch."),
    gen_length: int = typer.Option(32, help="Tokens to generate."),
    steps: int = typer.Option(32, help="Denoising steps (a multiple of the number of blocks)."),
    block_length: int = typer.Option(32, help="Semi-autoregressive block length (divides gen-length)."),
    temperature: float = typer.Option(0.0, help="Gumbel sampling temperature; 0 is greedy."),
    remasking: str = typer.Option("low_confidence", help="low_confidence, random, topk_margin, entropy, origin."),
    cfg_scale: float = typer.Option(0.0, help="Classifier-free guidance scale (0 = off)."),
    seed: int = typer.Option(0, help="Random seed."),
    history: bool = typer.Option(False, "--history", help="Print the sequence after every step."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Generate text with the denoising sampler."""
    from .diffusion.sampler import generate as sample
    from .models import load_model

    lm = load_model(model, device=device, dtype=dtype)
    out = sample(lm, prompt, gen_length=gen_length, steps=steps, block_length=block_length, temperature=temperature,
                 remasking=remasking, cfg_scale=cfg_scale, seed=seed, return_history=history)
    if history:
        for rec in out.history:
            for b in range(rec.x.shape[0]):
                shown = rec.x[b, out.prompt_length:].masked_fill(rec.mask[b, out.prompt_length:], -1).tolist()
                text = " ".join("_" if t < 0 else lm.to_text([t], skip_special=False) for t in shown)
                typer.echo(f"[step {rec.step:3d} | block {rec.block} | seq {b}] {text}")
    for p, text in zip(prompt, out.texts or [str(r.tolist()) for r in out.generated]):
        typer.echo(f"{p}{text}" if out.texts else f"{p} -> {text}")


def field_docs(cls) -> dict[str, str]:
    """Docstrings written under dataclass fields (they become --help)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def dataclass_command(cls, run, name: str, help: str) -> None:
    """Register `dlmscope NAME` with one flag per dataclass field plus --config FILE (YAML/JSON).

    Precedence: explicit flags > config file > dataclass defaults.
    """
    import dataclasses
    import inspect

    docs = field_docs(cls)
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                default=typer.Option(None, help="YAML or JSON file with any of these options."))]
    for f in dataclasses.fields(cls):
        annotation = {"bool": Optional[bool], "int": Optional[int], "float": Optional[float]}.get(
            getattr(f.type, "__name__", str(f.type)), Optional[str])
        flag = f"--{f.name.replace('_', '-')}"
        decls = [f"{flag}/--no-{f.name.replace('_', '-')}"] if annotation is Optional[bool] else [flag]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(None, *decls, help=f"{docs.get(f.name, '')} [default: {f.default}]",
                                                             show_default=False)))

    def command(**kwargs):
        from .training import load_config_file

        config = kwargs.pop("config")
        values = load_config_file(config) if config else {}
        values.update({k: v for k, v in kwargs.items() if v is not None})
        run(cls(**values))

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = help
    app.command(name=name, help=help)(command)


def _train_sae(cfg) -> None:
    from .training import train_sae

    result = train_sae(cfg)
    if not result.interrupted:
        for key, m in result.metrics.items():
            typer.echo(f"{key}: FVU {m['fvu']:.4f}  L0 {m['l0']:.1f}  dead {m['dead_fraction']:.3f}  "
                       f"cosine {m['cosine']:.4f} -> {result.saes[key]}")
        typer.echo(f"run folder: {result.folder} (report.html, metrics.json)")


def _register_train_sae() -> None:
    from .training import TrainSAEConfig

    dataclass_command(TrainSAEConfig, _train_sae, "train-sae",
                      "Train Top-K SAEs (one per layer and k) on a model's residual stream.")


_register_train_sae()


def _rspo(cfg) -> None:
    from .rl import train_rl

    log = train_rl(cfg)
    typer.echo(f"{cfg.algo} on {cfg.task}: test accuracy {log['before']['accuracy']:.3f} -> {log['after']['accuracy']:.3f}, "
               f"reward {log['before']['reward']:.3f} -> {log['after']['reward']:.3f}; checkpoints in {cfg.out}")


def _register_rspo() -> None:
    from .rl import RLConfig

    dataclass_command(RLConfig, _rspo, "rspo", "RL post-training of a DLM on a verifiable task (RSPO or diffu-GRPO).")


_register_rspo()


@app.command("eval-splice")
def eval_splice(
    sae: str = typer.Option(..., help="SAE name (registry) or folder."),
    model: str = ModelOpt,
    t_bins: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="Comma-separated mask ratios."),
    positions: str = typer.Option("all", help="Splice at all, masked or visible positions."),
    with_error: bool = typer.Option(False, help="Add the reconstruction error back."),
    n_seqs: int = typer.Option(64, help="Held-out sequences per bin."),
    context_length: int = typer.Option(128, help="Tokens per sequence."),
    out: Optional[str] = typer.Option(None, help="Write the result JSON here."),
    seed: int = typer.Option(0, help="Mask seed."),
    device: str = DeviceOpt,
) -> None:
    """Cross-entropy impact of splicing an SAE into the model (DLM: per mask-ratio bin)."""
    from .analysis.splice import SpliceConfig, splice_eval, splice_table
    from .data import heldout_rows
    from .io_utils import atomic_write_json
    from .models import load_model
    from .sae import load_sae

    lm = load_model(model, device=device)
    try:
        bins = tuple(float(v) for v in t_bins.split(","))
    except ValueError:
        raise DLMScopeError(f"t-bins={t_bins!r} must be comma-separated numbers in (0, 1]") from None
    if any(not 0 < b <= 1 for b in bins):
        raise DLMScopeError(f"t-bins={t_bins!r} must lie in (0, 1]")
    result = splice_eval(lm, load_sae(sae, device=device), heldout_rows(lm.tokenizer, context_length),
                         SpliceConfig(bins, positions, with_error, n_seqs, seed=seed))
    typer.echo(splice_table(result))
    if out:
        atomic_write_json(out, result)


@app.command("evaluate")
def evaluate_cmd(
    sae: str = typer.Argument(..., help="SAE name (registry) or folder."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model (default: the one the SAE records)."),
    out: Optional[str] = typer.Option(None, help="Folder for evaluation.json / .html (default: eval-<SAE name>)."),
    n_seqs: int = typer.Option(64, help="Held-out sequences for core metrics and t-curves."),
    t_bins: str = typer.Option("0.1,0.3,0.5,0.7,0.9", help="Comma-separated mask ratios."),
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
    from .models import load_model
    from .sae import load_sae

    try:
        cfg = EvaluateConfig(n_seqs=n_seqs, t_bins=tuple(float(v) for v in t_bins.split(",") if v.strip()),
                             splice_seqs=splice_seqs, probes=tuple(p.strip() for p in probes.split(",") if p.strip()),
                             probe_k=tuple(int(v) for v in probe_k.split(",") if v.strip()), absorption=absorption,
                             seed=seed)
    except ValueError as e:
        if isinstance(e, DLMScopeError):
            raise
        raise DLMScopeError(f"t-bins={t_bins!r} and probe-k={probe_k!r} must be comma-separated numbers") from None
    sae_obj = load_sae(sae, device=device)
    lm = load_model(model or sae_obj.cfg.model_name or DEFAULT_MODEL, device=device)
    result = evaluate_sae_suite(lm, sae_obj, heldout_rows(lm.tokenizer, context_length), cfg)
    path = write_report(result, out or f"eval-{Path(sae).name}")
    typer.echo("| t | FVU masked | FVU visible | L0 masked | L0 visible | ΔCE (all positions) |\n|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in summary_rows(result):
        typer.echo(f"| {r['t']:g} | {fmt(r['fvu_masked'])} | {fmt(r['fvu_visible'])} | {fmt(r['l0_masked'])} | "
                   f"{fmt(r['l0_visible'])} | {fmt(r['delta_ce'])} |")
    typer.echo(f"written {path} and {path.with_suffix('.html')}")


@app.command("cache")
def cache_cmd(
    out: str = typer.Argument(..., help="Cache folder (resumable: complete shards are kept)."),
    model: str = ModelOpt,
    layers: str = typer.Option("1,3", help="Comma-separated layers (resid_post)."),
    policy: str = typer.Option("", help="mask, unmask, all or clean (default by model type)."),
    t_min: float = typer.Option(0.05, help="Lowest mask ratio."),
    t_max: float = typer.Option(0.5, help="Highest mask ratio."),
    batches: int = typer.Option(0, help="Forward batches to cache (0 = one pass over the data)."),
    seqs_per_forward: int = typer.Option(32, help="Rows per forward."),
    context_length: int = typer.Option(128, help="Tokens per row."),
    dataset: str = typer.Option("builtin", help="Text source."),
    dtype: str = typer.Option("float32", help="Stored dtype: float32, bfloat16 or float16."),
    seed: int = typer.Option(0, help="Seed for order and masks."),
    device: str = DeviceOpt,
) -> None:
    """Write activations to sharded safetensors with a checksummed manifest."""
    from .activations import ActivationSource, write_cache
    from .data import load_texts, pack
    from .models import load_model
    from .models.checkpoint import resolve_dtype

    lm = load_model(model, device=device)
    rows = pack(lm.tokenizer, load_texts(dataset), context_length)
    hooks = [f"blocks.{int(i)}.hook_resid_post" for i in layers.split(",")]
    src = ActivationSource(lm, hooks, rows.input_ids, rows.doc_ids, policy=policy or None, t_range=(t_min, t_max),
                           seqs_per_batch=seqs_per_forward, seed=seed)
    folder = write_cache(src, out, batches or None, dtype=resolve_dtype(dtype))
    typer.echo(f"cache written to {folder}")


@app.command()
def steer(
    sae: str = typer.Option(..., help="SAE name (registry) or folder."),
    feature: int = typer.Option(..., help="Latent index to push."),
    model: str = ModelOpt,
    prompt: list[str] = typer.Option(["The list type"], "--prompt", "-p", help="Prompt; repeat for several."),
    strength: float = typer.Option(2.0, help="Added strength * max(A) (scale max) or strength (scale fixed)."),
    mode: str = typer.Option("sae", help="sae (edit latent, keep error) or direction (add W_dec[f])."),
    scale: str = typer.Option("max", help="max or fixed."),
    steps_schedule: str = typer.Option("all", "--schedule", help="all, first:FRACTION, or comma-separated steps."),
    positions: str = typer.Option("all", help="all, masked, generated or top:N."),
    gen_length: int = typer.Option(32, help="Tokens to generate."),
    steps: int = typer.Option(32, help="Denoising steps (DLMs)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (0 = greedy)."),
    seeds: str = typer.Option("0", help="Comma-separated seeds."),
    metrics: bool = typer.Option(True, help="Score both with the feature, AR-twin perplexity and DLM ELBO."),
    out: Optional[str] = typer.Option(None, help="Write the comparison JSON here."),
    device: str = DeviceOpt,
) -> None:
    """Generate with and without feature steering, side by side (DLM sampler or AR decoding)."""
    from .analysis.steering import SteeringSpec, compare, validate
    from .io_utils import atomic_write_json
    from .models import load_model
    from .models.zoo import DEFAULT_AR_MODEL, DEFAULT_MODEL
    from .sae import load_sae

    lm = load_model(model, device=device)
    try:
        sched = steps_schedule if steps_schedule == "all" or steps_schedule.startswith("first:") else \
            [int(v) for v in steps_schedule.split(",")]
        seed_list = [int(v) for v in seeds.split(",")]
    except ValueError:
        raise DLMScopeError(f"--schedule={steps_schedule!r} / --seeds={seeds!r}: expected all, first:FRACTION or "
                            "comma-separated integers") from None
    spec = SteeringSpec(feature, strength, mode, scale, sched, positions)
    the_sae = load_sae(sae, device=device)
    validate(spec, the_sae, lm)  # before the judges load: bad input fails fast
    judge = (lambda name: lm if lm.name == name else load_model(name, device=device)) if metrics else (lambda name: None)
    r = compare(lm, the_sae, spec, prompt, seed_list, None if metrics else [],
                judge(DEFAULT_AR_MODEL), judge(DEFAULT_MODEL), gen_length, steps, temperature)
    for p, b, s_ in zip(r["prompts"], r["unsteered_texts"], r["steered_texts"]):
        typer.echo(f"prompt   : {p}\nunsteered: {p}{b}\nsteered  : {p}{s_}\n")
    if metrics:
        typer.echo("| | feature act. | concept rate | AR perplexity | DLM NLL/token |\n|---|---|---|---|---|")
        for label in ("unsteered", "steered"):
            m = r[label]
            typer.echo(f"| {label} | {m['feature_activation']:.4f} | {m['concept_rate']:.3f} | {m['perplexity']:.1f} | "
                       f"{m['dlm_nll']:.3f} |")
    if out:
        atomic_write_json(out, r)


@app.command()
def order(
    sae: str = typer.Option(..., help="SAE name(s) or folder(s), comma-separated (one per layer)."),
    model: str = ModelOpt,
    prompt: list[str] = typer.Option(["The list type", "A dictionary is"], "--prompt", "-p", help="Prompts."),
    strategies: str = typer.Option("origin,low_confidence,topk_margin,entropy,sae_stability", help="Remasking orders."),
    task: str = typer.Option("sudoku", help="Task for accuracy (sudoku or countdown; empty to skip)."),
    n: int = typer.Option(50, help="Task examples."),
    steps: str = typer.Option("4,8,16", help="Comma-separated step budgets for the task and held-out likelihood."),
    gen_length: int = typer.Option(16, help="Tokens to generate."),
    heldout: int = typer.Option(32, help="Held-out rows for the order-following likelihood (0 to skip)."),
    out: Optional[str] = typer.Option(None, help="Write the result JSON here."),
    device: str = DeviceOpt,
) -> None:
    """Feature dynamics per remasking order, task accuracy and held-out likelihood, incl. the SAE-informed order."""
    from .analysis.order import feature_dynamics, make_strategy, order_log_likelihood, task_accuracy
    from .data import heldout_rows
    from .io_utils import atomic_write_json
    from .models import load_model
    from .sae import load_sae

    lm = load_model(model, device=device)
    saes = [load_sae(s.strip(), device=device) for s in sae.split(",") if s.strip()]
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    try:
        budgets = [int(v) for v in steps.split(",")]
    except ValueError:
        raise DLMScopeError(f"--steps={steps!r} must be comma-separated integers") from None
    rows = heldout_rows(lm.tokenizer, 2 * gen_length, heldout) if heldout else None
    result = {"dynamics": {}, "task": {}, "heldout_nll": {}}
    hooks = [s.cfg.hook_name for s in saes]
    head = "".join(f" L{lm.layer_of(h)} stability | L{lm.layer_of(h)} drift |" for h in hooks)
    head += "".join(f" {task} @{b} |" for b in budgets if task) + "".join(f" NLL @{b} |" for b in budgets if heldout)
    typer.echo(f"| order |{head}")
    typer.echo("|---|" + "---|" * head.count("|"))
    for name in names:
        dyn = feature_dynamics(lm, saes, prompt, make_strategy(name, saes[-1]), gen_length=gen_length, steps=gen_length)
        acc = {b: task_accuracy(lm, task, make_strategy(name, saes[-1]), n=n, steps=b, gen_length=gen_length)
               for b in budgets} if task else {}
        nll = {b: float(order_log_likelihood(lm, rows, gen_length, make_strategy(name, saes[-1]), b).mean())
               for b in budgets} if heldout else {}
        result["dynamics"][name], result["task"][name], result["heldout_nll"][name] = dyn["layers"], acc, nll
        cells = "".join(f" {dyn['layers'][h]['pre_mask_stability']:.3f} | {dyn['layers'][h]['post_decode_drift']:.3f} |"
                        for h in hooks)
        typer.echo(f"| {name} |{cells}" + "".join(f" {acc[b]['accuracy']:.2f} |" for b in acc)
                   + "".join(f" {nll[b]:.3f} |" for b in nll))
    if out:
        atomic_write_json(out, result)


@app.command()
def stability(
    sae: str = typer.Option(..., help="SAE trained on the first checkpoint (name or folder)."),
    checkpoints: str = typer.Option(..., help="Comma-separated checkpoints; the first is the SAE's own."),
    saes: str = typer.Option("", help="Optional comma-separated SAEs, one per checkpoint, for decoder matching."),
    control_sae: str = typer.Option("", help="Second SAE on the first checkpoint (other seed): the matching floor."),
    n_seqs: int = typer.Option(32, help="Held-out sequences."),
    out: str = typer.Option("stability", help="Folder for report.json and report.html."),
    device: str = DeviceOpt,
) -> None:
    """How stable an SAE's features are across checkpoints (e.g. before and after RL)."""
    from pathlib import Path

    from .analysis.stability import stability_report, stability_table, write_report_html
    from .data import heldout_rows
    from .io_utils import atomic_write_json
    from .models import load_model
    from .sae import load_sae

    lms = [load_model(c.strip(), device=device) for c in checkpoints.split(",") if c.strip()]
    per = [load_sae(s_.strip(), device=device) for s_ in saes.split(",") if s_.strip()]
    if per and len(per) != len(lms):
        raise DLMScopeError(f"--saes lists {len(per)} SAEs for {len(lms)} checkpoints; give one per checkpoint or none")
    control = load_sae(control_sae, device=device) if control_sae else None
    report = stability_report(load_sae(sae, device=device), lms, heldout_rows(lms[0].tokenizer, 128),
                              saes_per_checkpoint=per or None, control_sae=control, n_seqs=n_seqs)
    typer.echo(stability_table(report))
    atomic_write_json(Path(out) / "report.json", report)
    write_report_html(report, Path(out) / "report.html")


features_app = typer.Typer(help="Feature statistics for the explorer.", no_args_is_help=True)
app.add_typer(features_app, name="features")
DEFAULT_SAE = "tiny-dlm-L3-k32"


def _default_store(model: str, sae: str):
    from pathlib import Path

    from .data import cache_dir

    return cache_dir() / "stores" / f"{Path(model).name}__{Path(sae).name}"


def _build_store(sae_name: str, model: Optional[str], out: Optional[str], cfg, device: str):
    """Load the SAE and its model (the one recorded in the SAE unless given), build the store; its folder."""
    import time
    from pathlib import Path

    from .analysis.features import build_feature_store
    from .data import heldout_rows
    from .models import load_model
    from .sae import load_sae

    sae = load_sae(sae_name, device=device)
    model = model or sae.cfg.model_name or DEFAULT_MODEL
    lm = load_model(model, device=device)
    ref = lambda name: str(Path(name).resolve()) if Path(name).expanduser().is_dir() else name  # noqa: E731
    t0 = time.perf_counter()
    folder = build_feature_store(lm, sae, heldout_rows(lm.tokenizer, cfg.context_length),
                                 out or _default_store(lm.name, sae_name), cfg, sae_name=ref(sae_name),
                                 model_ref=ref(model))
    typer.echo(f"feature store for {sae_name} on {lm.name} written to {folder} in {time.perf_counter() - t0:.1f} s")
    return folder


@features_app.command("build")
def features_build(
    sae: str = typer.Option(DEFAULT_SAE, help="SAE name or folder."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model (default: the one the SAE records)."),
    out: Optional[str] = typer.Option(None, help="Store folder (default: ~/.cache/dlmscope/stores/<model>__<sae>)."),
    n_seqs: Optional[int] = typer.Option(None, help="Held-out sequences to encode (default: all)."),
    context_length: int = typer.Option(128, help="Tokens per sequence."),
    batch_size: int = typer.Option(16, help="Sequences per forward pass."),
    t_low: float = typer.Option(0.05, help="Lowest mask ratio."),
    t_high: float = typer.Option(0.5, help="Highest mask ratio."),
    seed: int = typer.Option(0, help="Seed of the mask draws."),
    device: str = DeviceOpt,
) -> None:
    """Precompute per-feature statistics, examples, histograms and logit effects into a store."""
    from .analysis.features import FeatureStoreConfig

    cfg = FeatureStoreConfig(n_seqs=n_seqs, context_length=context_length, batch_size=batch_size, t_low=t_low,
                             t_high=t_high, seed=seed)
    _build_store(sae, model, out, cfg, device)


@app.command()
def explore(
    sae: str = typer.Option(DEFAULT_SAE, help="SAE name or folder."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model (default: the one the SAE records)."),
    store: Optional[str] = typer.Option(None, help="Feature store folder (built on first launch if missing)."),
    splice: Optional[str] = typer.Option(None, help="Splice JSON for the summary page (default: <store>/splice.json)."),
    port: int = typer.Option(8501, help="Port for the Streamlit server."),
    address: str = typer.Option("127.0.0.1", help="Address the server listens on."),
    device: str = DeviceOpt,
) -> None:
    """Launch the Streamlit feature explorer (builds the feature store first when it is missing or outdated)."""
    import subprocess
    from pathlib import Path

    from .analysis.features import FeatureStore, FeatureStoreConfig

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
           "--sae", sae] + (["--model", model] if model else []) + (["--splice", splice] if splice else [])
    sys.exit(subprocess.call(cmd))


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except DLMScopeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if not isinstance(e, _usage_errors()):
            raise
        typer.echo(f"error: {e.format_message()} (see --help)", err=True)
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
