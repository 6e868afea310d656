"""Every marked README table or paragraph is backed by a committed result file (see docs/DEVELOPING.md).

A marker line `<!-- result:PATH[,PATH...] -->` covers the block after it (a table, or the paragraph up to the
next blank line): every decimal number in the block (it has a '.'; integers are labels and settings) must
equal, at its printed precision, a number in one of the JSON files; a number followed by % may also match
a fraction. `<!-- result:PATH render=SCRIPT:FUNCTION -->` is exact: FUNCTION(json) from SCRIPT must return
the block verbatim. Every README table needs a marker, except in the sections listed in UNMARKED.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- result:(\S+?)(?: render=(\S+):(\w+))? -->$")
NUMBER = re.compile(r"(?<![\w.])[-+−]?(\d{1,3}(?:,\d{3})+|\d+)\.(\d+)(%?)")
SECTION = re.compile(r"^<!-- section:(\S+) -->$")
RULE = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")
# Sections whose tables are not marked yet (owned by other work in progress); shrink this set, never grow it.
UNMARKED: set[str] = set()


def blocks(text: str):
    """(line number, paths, renderer, block text) for every marker in the text."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = MARKER.match(line.strip())
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        start, table = j, j < len(lines) and lines[j].startswith("|")
        while j < len(lines) and lines[j].strip() and (lines[j].startswith("|") or not table):
            j += 1
        yield i + 1, m.group(1).split(","), (m.group(2), m.group(3)) if m.group(2) else None, "\n".join(lines[start:j])


def json_numbers(value, out: list[float]) -> list[float]:
    if isinstance(value, bool):
        return out
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            out.append(float(value))
    elif isinstance(value, dict):
        for v in value.values():
            json_numbers(v, out)
    elif isinstance(value, list):
        for v in value:
            json_numbers(v, out)
    return out


def unbacked(block: str, numbers: list[float]) -> list[str]:
    """Decimal numbers of the block that no JSON number rounds to (a trailing % also matches fractions)."""
    missing = []
    for m in NUMBER.finditer(block):
        sign = -1 if m.group(0)[0] in "-−" else 1
        value = sign * float(m.group(1).replace(",", "") + "." + m.group(2))
        digits = len(m.group(2))
        scales = (1, 100) if m.group(3) else (1,)
        if not any(abs(round(x * s, digits) - value) < 0.5 * 10**-digits + 1e-12 or
                   abs(round(abs(x) * s, digits) - value) < 0.5 * 10**-digits + 1e-12
                   for x in numbers for s in scales):
            missing.append(m.group(0))
    return missing


def rendered(renderer: tuple[str, str], data: list) -> str:
    """FUNCTION(*json) of the script SCRIPT, stripped (its folder importable, as when it runs)."""
    folder = str((ROOT / renderer[0]).parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location("render_" + Path(renderer[0]).stem, ROOT / renderer[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, renderer[1])(*data).strip()


def check_block(paths: list[str], renderer, block: str) -> list[str]:
    """Problems of one marked block, as readable lines (empty: backed)."""
    for p in paths:
        if not (ROOT / p).is_file():
            return [f"{p} does not exist"]
    data = [json.loads((ROOT / p).read_text()) for p in paths]
    if renderer:
        expected = rendered(renderer, data)
        return [] if expected == block.strip() else [f"differs from {renderer[0]}:{renderer[1]}; expected:\n{expected}"]
    return [f"{n} is in none of {paths}" for n in unbacked(block, [x for d in data for x in json_numbers(d, [])])]


def unmarked_tables(text: str) -> list[tuple[int, str]]:
    """(line, section) of every table that no marker covers, outside UNMARKED sections."""
    lines, section, out, fence = text.splitlines(), "", [], False
    covered = {i for _, _, _, b in blocks(text) for i in [b]}
    for i, line in enumerate(lines):
        if m := SECTION.match(line.strip()):
            section = m.group(1)
        fence = fence ^ line.startswith("```")
        starts = not fence and i + 1 < len(lines) and line.startswith("|") and RULE.match(lines[i + 1].strip())
        if starts and section not in UNMARKED:
            block = "\n".join(lines[i: next((j for j in range(i, len(lines)) if not lines[j].startswith("|")), len(lines))])
            if not any(block in b for b in covered):
                out.append((i + 1, section))
    return out


README_BLOCKS = list(blocks(README.read_text()))


@pytest.mark.parametrize("line,paths,renderer,block", README_BLOCKS, ids=[f"README:{b[0]}" for b in README_BLOCKS])
def test_readme_block_is_backed(line, paths, renderer, block):
    problems = check_block(paths, renderer, block)
    assert not problems, f"README.md line {line}: " + "; ".join(problems)


def test_every_readme_table_has_a_marker():
    assert not unmarked_tables(README.read_text()), "README tables without a <!-- result:... --> marker (line, section)"


def test_checker_catches_unbacked_numbers():
    nums = [0.0834, 0.05312, 1.0, 37.26]
    assert unbacked("FVU 0.083, dead 5.3%, 37.3 s, 3 layers", nums) == []
    assert unbacked("FVU 0.084 and 0.08", nums) == ["0.084"]
    assert unbacked("ΔCE -1.00 [+0.05, +0.06]", [-1.0, 0.053]) == ["+0.06"]


def test_checker_blocks_and_exact_renderers(tmp_path):
    text = "intro\n<!-- result:a.json -->\n| x | 0.50 |\n|---|---|\n\nafter 0.70\n\n| y |\n|---|\n|e| not a table\n"
    (found,) = blocks(text)
    assert found[1:] == (["a.json"], None, "| x | 0.50 |\n|---|---|")
    assert [line for line, _ in unmarked_tables(text)] == [8]
    assert check_block(["no/such.json"], None, "0.1") == ["no/such.json does not exist"]


def test_render_blocks_are_compared_and_rewritten(tmp_path):
    (tmp_path / "r.json").write_text('{"x": 0.25}')
    (tmp_path / "r.py").write_text("def table(d):\n    return f'| x |\\n|---|\\n| {d[\"x\"]:.2f} |'\n")
    text = f"<!-- result:{tmp_path}/r.json render={tmp_path}/r.py:table -->\n| x |\n|---|\n| 0.99 |\n\nend\n"
    (_, paths, renderer, block), = blocks(text)
    assert "expected:\n| x |\n|---|\n| 0.25 |" in check_block(paths, renderer, block)[0]
    new = write_rendered(text)
    assert new.endswith("| 0.25 |\n\nend\n") and "0.99" not in new
    (_, paths, renderer, block), = blocks(new)
    assert check_block(paths, renderer, block) == []


def write_rendered(text: str) -> str:
    """The README with every `render=` block replaced by its renderer's current output."""
    lines = text.splitlines()
    for line, paths, renderer, block in reversed(list(blocks(text))):
        if renderer:
            data = [json.loads((ROOT / p).read_text()) for p in paths]
            start = line + next(i for i, x in enumerate(lines[line:]) if x.strip())
            lines[start: start + len(block.splitlines())] = rendered(renderer, data).splitlines()
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python tests/test_provenance.py: rewrite the README's render= tables from their JSON
    README.write_text(write_rendered(README.read_text()))
