"""The layer between dataclass configs and the typer CLI, and the CLI's conventions.

- `dataclass_command(app, cls, run, name, help)`: `dlmscope NAME` with one flag per field of `cls` (type hints
  resolved with `typing.get_type_hints`, so `int | None` is an optional int and a `Literal` or `choices(...)`
  field shows its choices), the field's docstring (looked up along the MRO) as help and its default shown,
  plus `--config FILE`. Precedence: flags given > config file > dataclass defaults.
- `aliases={"--old": "--new"}`: deprecated spellings that still work for one release with a one-line warning.
- `escape_markup(command)`: help texts are plain text; Rich must not read `W_dec[f]` or `[default: x]` as markup.
- `positional_or_option(...)`: the deprecated positional MODEL / SAE of older releases.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Any, Callable, Literal, Optional

import typer
import typer.core

from .errors import DLMScopeError
from .options import allowed_values, field_default, load_config_file, split_optional, type_hints


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under dataclass fields, along the MRO (a subclass's own text wins)."""
    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        klass_node = tree.body[0]
        assert isinstance(klass_node, ast.ClassDef)  # getsource of a class
        body = klass_node.body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant):
                docs.setdefault(node.target.id, " ".join(str(nxt.value.value).split()))
    return docs


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def warn_deprecated(old: str, new: str) -> None:
    typer.echo(f"warning: {old} is deprecated and will be removed in the next release; use {new}", err=True)


def alias_command(aliases: dict[str, str]) -> type:
    """A command class that reads each deprecated spelling in `aliases` as its new flag, with a warning."""

    class AliasedCommand(typer.core.TyperCommand):
        def parse_args(self, ctx, args: list[str]) -> list[str]:
            out = []
            for i, arg in enumerate(args):
                if arg == "--":
                    out += args[i:]
                    break
                name, eq, value = arg.partition("=")
                negated = name.startswith("--no-") and f"--{name[5:]}" in aliases
                if name in aliases or negated:
                    new = aliases[f"--{name[5:]}"] if negated else aliases[name]
                    warn_deprecated(name, f"--no-{new[2:]}" if negated else new)
                    arg = (f"--no-{new[2:]}" if negated else new) + eq + value
                out.append(arg)
            return super().parse_args(ctx, out)

    return AliasedCommand


def _annotation(f: dataclasses.Field, hint: Any) -> Any:
    base, optional = split_optional(hint)
    allowed = allowed_values(f, hint)
    if allowed:
        base = Literal.__getitem__(allowed)
    return Optional[base] if optional or f.default is dataclasses.MISSING else base


def _option(f: dataclasses.Field, hint: Any, doc: str, formerly: list[str]) -> Any:
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default = None if required else field_default(f)
    base, _ = split_optional(hint)
    decls = [f"{flag(f.name)}/--no-{f.name.replace('_', '-')}"] if base is bool else [flag(f.name)]
    help_text = doc + (f" (formerly {', '.join(formerly)}, deprecated)" if formerly else "")
    shown: Any = True
    if required:
        shown = "required unless in --config"
    elif default is None:
        shown = f.metadata.get("unset", "unset")
    return typer.Option(default, *decls, help=help_text, show_default=shown)


def dataclass_command(app: typer.Typer, cls: type, run: Callable[[Any], None], name: str, help: str,
                      aliases: dict[str, str] | None = None) -> None:
    """Register `dlmscope NAME`: one flag per field of the dataclass `cls` plus --config (module docstring)."""
    aliases = aliases or {}
    docs, hints = field_docs(cls), type_hints(cls)
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
              inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                default=typer.Option(None, help="YAML or JSON file with any of these options "
                                                     "(flags given on the command line win).",
                                                     show_default="none"))]
    fields = dataclasses.fields(cls)
    for f in fields:
        formerly = [old for old, new in aliases.items() if new == flag(f.name)]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=_annotation(f, hints[f.name]),
                                        default=_option(f, hints[f.name], docs.get(f.name, ""), formerly)))

    def command(ctx: typer.Context, **kwargs) -> None:
        config = kwargs.pop("config")
        values = load_config_file(config, cls) if config else {}
        for key, value in kwargs.items():
            source = ctx.get_parameter_source(key)
            if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT"):
                values[key] = value
        missing = [flag(f.name) for f in fields if f.default is dataclasses.MISSING and f.name not in values]
        if missing:
            raise DLMScopeError(f"{', '.join(missing)} is required (as a flag or a --config key)")
        run(cls(**values))

    setattr(command, "__signature__", inspect.Signature(params))  # what typer reads the options from
    command.__doc__ = help
    app.command(name=name, help=help, cls=alias_command(aliases) if aliases else None)(command)


def escape_markup(command) -> None:
    """Escape Rich markup in the help of `command` and every subcommand and parameter (help is plain text)."""
    from rich.markup import escape

    for attr in ("help", "short_help", "epilog"):
        if getattr(command, attr, None):
            setattr(command, attr, escape(getattr(command, attr)))
    for param in getattr(command, "params", []):
        if getattr(param, "help", None):
            param.help = escape(param.help)
    for sub in getattr(command, "commands", {}).values():
        escape_markup(sub)


def positional_or_option(positional: str | None, option: str | None, name: str,
                         default: str | None = None) -> str | None:
    """The value of `--name`, or of the deprecated positional argument (with a warning); not both."""
    if positional is not None:
        if option is not None:
            raise DLMScopeError(f"give {name.upper()} once: as --{name} (the positional form is deprecated)")
        warn_deprecated(f"the positional {name.upper()}", f"--{name}")
        return positional
    return option if option is not None else default
