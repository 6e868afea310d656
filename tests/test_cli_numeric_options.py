"""Property-style walk over every command's numeric options (found by introspecting the typer app, not listed by
hand): NaN, infinities, negative and huge values either fail in one line naming the option (exit 2, before any model
or SAE loads) or are accepted, which shows as the later one-line error about the deliberately missing model."""

from __future__ import annotations

import inspect
import typing

import pytest

from dlmscope.cli import app, main

MISSING = "/no/such/dlmscope-input"
"""Every model / SAE / checkpoint the walk names: a value that gets past the option checks fails on it instead."""

BAD = {float: ["nan", "inf", "-inf", "-1", "1e30"], int: ["-1", f"-{10**23}", str(10**23)]}

UNBOUNDED = {"-1": False, "1e30": True}
"""Positive floats without an upper bound (learning rates, temperatures, scales) take 1e30 and refuse -1."""
CONSISTENT = {"patch": ["--clean", "a b c", "--answer", "d", "--change", "1=x", "--metric", "logprob", "--feature", "0",
                       "--sweep", "none", "--hooks", "blocks.0.hook_resid_pre"]}
"""Options a command needs (its required ones the generator does not mark, and those needed together) before it
reaches its counts' checks."""

ACCEPTED = {  # (command, flag) -> values that are legitimately allowed (they reach the model / SAE loading)
    **{(cmd, flag): {"1e30"} for cmd, flags in {
        "train-sae": ("--lr", "--aux-coef"), "diff": ("--lr", "--aux-coef", "--nu-max"),
        "rspo": ("--lr", "--lam", "--lora-alpha", "--temperature"),
        "generate": ("--temperature", "--cfg-scale", "--alg-temp"), "steer": ("--temperature",)}.items()
       for flag in flags},
    ("train-sae", "--l0-coef"): {"1e30"}, ("train-sae", "--bandwidth"): {"1e30"},
    ("patch", "--target"): {"-1"},  # a position counted from the end
    **{("attribute", flag): {"-1"} for flag in ("--step", "--token", "--contrast")},  # -1: its documented "auto"
    ("steer", "--strength"): {"-1", "1e30"},  # negative steering pushes a feature down; the size is the user's call
}


def _commands(typer_app, prefix=()):
    for info in typer_app.registered_commands:
        yield (*prefix, info.name or info.callback.__name__), info.callback
    for group in typer_app.registered_groups:
        yield from _commands(group.typer_instance, (*prefix, group.name))


def _numeric(annotation) -> type | None:
    """int or float for an option typed int, float or Optional of them; None otherwise."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


def _flag(name: str, default) -> str:
    return next((d for d in getattr(default, "param_decls", ()) or () if d.startswith("--")),
                f"--{name.replace('_', '-')}").split("/")[0]


def _cases():
    for path, fn in _commands(app):
        params = inspect.signature(fn, eval_str=True).parameters
        base = list(path)
        for name, p in params.items():
            is_argument = type(p.default).__name__ == "ArgumentInfo"
            required = getattr(p.default, "default", None) is ...
            if name in ("model", "sae", "checkpoints", "out") or required:
                value = {"checkpoints": f"{MISSING}-a,{MISSING}-b", "out": "{tmp}/out"}.get(name, MISSING)
                value = "0" if _numeric(p.annotation) else value
                base += [value] if is_argument else [_flag(name, p.default), value]
        base += CONSISTENT.get(" ".join(path), [])
        for name, p in params.items():
            kind = _numeric(p.annotation)
            if kind is None or type(p.default).__name__ == "ArgumentInfo":
                continue
            for value in BAD[kind]:
                flag = _flag(name, p.default)
                yield pytest.param(base, flag, name, value, id=f"{' '.join(path)} {flag} {value}")


CASES = list(_cases())


def test_the_walk_finds_every_numeric_option():
    """The walk reaches every command that has numeric options, the dataclass-generated ones included."""
    walked = {" ".join(path) for path, fn in _commands(app)
              if any(c.values[0][:len(path)] == list(path) for c in CASES)}
    assert {"generate", "generate-blocks", "train-sae", "rspo", "diff", "features build", "evaluate", "cache", "steer",
            "order", "experts", "explore", "eval-splice", "stability"} <= walked and len(CASES) > 300


@pytest.mark.parametrize("base,flag,name,value", CASES)
def test_numeric_option_bad_values(base, flag, name, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # default outputs (runs/, eval-*/) would land here
    argv = [a.format(tmp=tmp_path) for a in base] + [flag, value]
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    err = out.err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, (argv, out.out, err)
    assert not out.out.strip(), f"noise before the error: {out.out!r}"
    if value in ACCEPTED.get((base[0] if base[0] != "features" else " ".join(base[:2]), flag), ()):
        assert MISSING in err, err  # accepted: it got as far as loading the missing input
    else:
        assert (flag in err or f"{name}=" in err) and MISSING not in err, err
