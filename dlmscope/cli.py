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

    lm = load_model(model, device=device, dtype=dtype)
    layers = lm.n_layers
    summary = {
        "name": lm.name, "family": lm.family, "diffusion": lm.is_diffusion, "n_layers": layers,
        "d_model": lm.d_model, "vocab_size": lm.vocab_size, "mask_id": lm.mask_id, "shifted_logits": lm.shift,
        "parameters": lm.n_params(),
        "hook_names": f"blocks.{{0..{layers - 1}}}.hook_resid_{{{','.join(sorted({n.rsplit('_', 1)[1] for n in lm.hook_names}))}}}",
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
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
