from dataclasses import dataclass, field
from typing import Literal

import typer

from dlmscope.cli_options import dataclass_command, field_docs
from dlmscope.options import Options, unset
from dlmscope.training import DiffConfig


def test_field_docs_are_read_along_the_mro():
    docs = field_docs(DiffConfig)
    assert docs["lr"] == "Learning rate." and docs["total_tokens"] == "Training tokens per crosscoder."  # own text wins
    assert docs["dataset"].startswith("Text source") and docs["warmup_steps"].startswith("Steps of linear")
    assert set(docs) == {f for f in DiffConfig.__dataclass_fields__}  # every field, from whichever part


@dataclass
class _Part(Options):
    mode: Literal["a", "b"] = "a"
    """Which mode [b] is bold in Rich markup."""


@dataclass
class _Config(_Part):
    size: int | None = field(default=None, metadata=unset("as large as fits"))
    """How many."""
    rate: float = 0.5
    """A rate."""


def test_generated_command_types_defaults_precedence_and_aliases(tmp_path, capsys, monkeypatch):
    from dlmscope.cli_options import escape_markup

    seen = []
    app = typer.Typer()
    dataclass_command(app, _Config, seen.append, "go", "Run it.", aliases={"--speed": "--rate"})
    app.command("other")(lambda: None)  # a group, as in dlmscope
    cmd = typer.main.get_command(app)
    escape_markup(cmd)
    (tmp_path / "c.yaml").write_text("rate: 0.25\nsize: 3\n")
    cmd.main(["go", "--config", str(tmp_path / "c.yaml"), "--size", "7"], standalone_mode=False)
    assert seen[-1] == _Config(mode="a", size=7, rate=0.25)  # flag > config file > default
    cmd.main(["go", "--speed", "0.75", "--mode", "b"], standalone_mode=False)
    assert seen[-1] == _Config(mode="b", size=None, rate=0.75)
    assert "warning: --speed is deprecated" in capsys.readouterr().err
    monkeypatch.setenv("COLUMNS", "300")
    cmd.main(["go", "--help"], standalone_mode=False)
    out = capsys.readouterr().out
    assert "<a|b>" in out and "Which mode [b] is bold in Rich markup." in out
    assert "[default: (as large as fits)]" in out and "[default: 0.5]" in out and "(formerly --speed" in out
    size = next(p for p in cmd.commands["go"].params if p.name == "size")
    assert "int" in size.display_type(None) and size.default is None
