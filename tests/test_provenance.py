"""Every marked README table or paragraph is backed by a committed result file (see docs/DEVELOPING.md).

A marker line `<!-- result:PATH[,PATH...] -->` covers the block after it (a table, or the paragraph up to the
next blank line): every decimal number in the block (it has a '.') must equal, at its printed precision, a
number in one of the JSON files; a number followed by % may also match a fraction (k, M, B: thousands,
millions, billions; ms: seconds; MB, GB, TB: bytes). Integers are settings and labels unless they state an
outcome: the N of "N of M" and the N of "N specific latents", "N puzzles gained", "N survive" (CLAIM) must be
numbers of the files. Decimals, counts and claims outside every marked block fail, except the settings and
citations ALLOWED names and, for now, the unbound lines PENDING counts per section.
`<!-- result:PATH render=SCRIPT:FUNCTION -->` is exact: FUNCTION(json) from SCRIPT must return the block
verbatim, so a label cannot carry another row's value. Every README table needs a marker (except in the
sections listed in UNMARKED) and a renderer (except the hand-written tables HANDWRITTEN counts).
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
NUMBER = re.compile(r"(?<![\w.])[-+−]?(\d{1,3}(?:,\d{3})+|\d+)\.(\d+)( ms\b| [MGT]B\b|[%kMB]?)")
COUNT = re.compile(r"(?<![\w.,])(\d+) (?:of|out of) (?:the |its |their )?(\d+)(?![\w.,])")  # "3 of 6 survive"
# Integers that state an outcome, not a setting: "0 specific latents", "5 puzzles gained", "74 survive".
CLAIM = re.compile(r"(?<![\w.,/-])(\d{1,3}(?:,\d{3})+|\d+) (?:(?:[\w-]+ )?(?:puzzles?|tests?|latents?|features?|"
                   r"comparisons?|runs?) )?(?:(?:checkpoint-)?specific|dead|surviv\w*|significant|gained|"
                   r"lost|solved|flipped|fail\w*|pass\w*)\b")
SCALES = {"": (1,), "%": (1, 100), "k": (1, 1e-3), "M": (1, 1e-6), "B": (1, 1e-9),
          " ms": (1, 1e3), " MB": (1, 1e-6), " GB": (1, 1e-9), " TB": (1, 1e-12)}  # seconds, bytes
SECTION = re.compile(r"^<!-- section:(\S+) -->$")
RULE = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")
# Sections whose tables are not marked yet (owned by other work in progress); shrink this set, never grow it.
UNMARKED: set[str] = set()
# Marked tables still written by hand (values checked one by one, not against their labels), per section: none left.
# Keep it empty: a new table is a `render=` view of its result file.
HANDWRITTEN: dict[str, int] = {}
# Decimal numbers outside every marked block fail, except settings and citations these patterns name (matched on
# the line with `code spans` removed): versions, arXiv ids, mask ratios, rule thresholds and hyperparameters.
ALLOWED = [re.compile(p) for p in (
    r"Python \d+\.\d+", r"arXiv \d{4}\.\d{4,5}", r"LLaDA 2\.\d( / 2\.\d)?", r"\bt ?[=~] ?U?\[?\d?\.\d+(, \d?\.\d+\])?",
    r"U\[\d?\.\d+, \d?\.\d+\]", r"(threshold|above|below|exceeds|[<>]=?) \d?\.\d+", r"(lambda|beta|masked at) \d?\.\d+",
    r"\(0\.05-0\.5\)", r"\(1\.0 / 0\.1 / 0\.0", r"mean\[0\.5 lambda",  # defaults, reward levels, a formula
    r"Fast-dLLM reports [^(]*",  # a paper's own figures, cited as such
    r"\d+\.\d+\.\d+", r"[<>]=?\d+\.\d+", r"transformers \d+\.\d+",  # package versions and bounds
    r"\d+\.0 removed", r"(?:LLaDA|Released) 2\.\d( and 2\.\d)?", r"\b2\.\d's",  # model and package releases
    r"\w+=\d?\.\d+", r"\d?\.\d+ by default")]  # settings
# Sections with unmarked numeric lines still to bind to their files, and how many such lines each may keep;
# shrink these counts, never grow them (a new number goes under a marker).
PENDING: dict[str, int] = {}


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
    """Decimal numbers of the block that no JSON number rounds to (a trailing % also matches fractions, k / M / B
    thousands / millions / billions); settings the ALLOWED patterns name are skipped."""
    missing = []
    for pattern in ALLOWED:
        block = pattern.sub("", block)
    for m in NUMBER.finditer(block):
        sign = -1 if m.group(0)[0] in "-−" else 1
        value = sign * float(m.group(1).replace(",", "") + "." + m.group(2))
        digits = len(m.group(2))
        scales = SCALES[m.group(3)]
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
    numbers = [x for d in data for x in json_numbers(d, [])]
    prose = re.sub(r"`[^`]*`", "", block)
    return [f"{n} is in none of {paths}" for n in unbacked(block, numbers)] + [
        f"the count {m.group(0)!r}: {m.group(1)} is in none of {paths}" for m in COUNT.finditer(prose)
        if int(m.group(1)) and float(m.group(1)) not in numbers] + [
        f"the claim {m.group(0)!r}: {m.group(1)} is in none of {paths}" for m in CLAIM.finditer(prose)
        if float(m.group(1).replace(",", "")) not in numbers]


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


def handwritten_tables(text: str) -> dict[str, int]:
    """{section: marked tables without a renderer}: their labels and values are not bound to each other."""
    lines, out = text.splitlines(), {}
    sections = [""] * len(lines)
    for i, line in enumerate(lines):
        m = SECTION.match(line.strip())
        sections[i] = m.group(1) if m else sections[i - 1] if i else ""
    for line, _, renderer, block in blocks(text):
        if block.startswith("|") and not renderer:
            out[sections[line - 1]] = out.get(sections[line - 1], 0) + 1
    return out


def covered_lines(text: str) -> set[int]:
    """0-based indices of the lines that marked blocks cover."""
    lines, out = text.splitlines(), set()
    for line, _, _, block in blocks(text):
        start = line + next(i for i, x in enumerate(lines[line:]) if x.strip())
        out.update(range(start, start + len(block.splitlines())))
    return out


def unmarked_numbers(text: str) -> dict[str, list[str]]:
    """{section: lines with a decimal number outside every marked block, code and allowed patterns removed}."""
    covered, out, section, fence = covered_lines(text), {}, "", False
    for i, line in enumerate(text.splitlines()):
        if m := SECTION.match(line.strip()):
            section = m.group(1)
        if line.startswith("```"):
            fence = not fence
            continue
        if fence or i in covered or MARKER.match(line.strip()):
            continue
        bare = re.sub(r"`[^`]*`", "", line)
        for pattern in ALLOWED:
            bare = pattern.sub("", bare)
        if NUMBER.search(bare) or COUNT.search(bare) or CLAIM.search(bare):
            out.setdefault(section, []).append(line.strip())
    return out


README_BLOCKS = list(blocks(README.read_text()))


@pytest.mark.parametrize("line,paths,renderer,block", README_BLOCKS, ids=[f"README:{b[0]}" for b in README_BLOCKS])
def test_readme_block_is_backed(line, paths, renderer, block):
    problems = check_block(paths, renderer, block)
    assert not problems, f"README.md line {line}: " + "; ".join(problems)


def test_every_readme_table_has_a_marker():
    assert not unmarked_tables(README.read_text()), "README tables without a <!-- result:... --> marker (line, section)"


def test_tables_are_rendered_views():
    """A table is FUNCTION(json) of its result file, so a label cannot carry another row's value."""
    found = handwritten_tables(README.read_text())
    over = {s: n for s, n in found.items() if n > HANDWRITTEN.get(s, 0)}
    assert not over, f"hand-written tables (section: count) beyond HANDWRITTEN {HANDWRITTEN}: {over}; add render="


def test_no_decimal_number_outside_a_marked_block():
    """Numbers belong under a marker; the sections in PENDING may keep at most their count of unbound lines."""
    found = unmarked_numbers(README.read_text())
    over = {s: lines for s, lines in found.items() if len(lines) > PENDING.get(s, 0)}
    assert not over, "README lines with decimal numbers outside any <!-- result:... --> block: " + "; ".join(
        f"[{s}] " + " | ".join(lines) for s, lines in over.items())


def test_unmarked_number_checker():
    text = ("<!-- section:a -->\nPython 3.11, threshold 0.9, `first:0.1`, t = 0.5\nFVU 0.25 here\n"
            "<!-- result:x.json -->\ncovered 0.5\n\n```\ncode 1.5\n```\n")
    assert unmarked_numbers(text) == {"a": ["FVU 0.25 here"]}


def test_checker_catches_unbacked_numbers():
    nums = [0.0834, 0.05312, 1.0, 37.26]
    assert unbacked("FVU 0.083, dead 5.3%, 37.3 s, 3 layers", nums) == []
    assert unbacked("FVU 0.084 and 0.08", nums) == ["0.084"]
    assert unbacked("ΔCE -1.00 [+0.05, +0.06]", [-1.0, 0.053]) == ["+0.06"]
    assert unbacked("7.2M parameters, t = 0.5", [7212288.0]) == []


def test_counts_are_checked(tmp_path):
    (tmp_path / "c.json").write_text('{"survive": 3, "tests": 6}')
    assert check_block([str(tmp_path / "c.json")], None, "3 of 6 survive, 0 of 6 fail") == []
    assert check_block([str(tmp_path / "c.json")], None, "4 of 6 survive")[0].startswith("the count '4 of 6'")


def test_integer_claims_are_checked(tmp_path):
    """An outcome count ("N specific latents", "N puzzles gained") must be a number of the file; a setting
    ("1,024 latents", "16 texts") is not a claim."""
    (tmp_path / "c.json").write_text('{"specific": 0, "gained": 5, "lost": 0, "survivors": 74}')
    path = [str(tmp_path / "c.json")]
    ok = "0 specific latents; 5 puzzles gained and 0 lost; 74 survive Holm; 1,024 latents, 16 texts"
    assert check_block(path, None, ok) == []
    assert check_block(path, None, "3 checkpoint-specific latents") == [
        f"the claim '3 checkpoint-specific': 3 is in none of {path}"]
    assert [p.split(":")[0] for p in check_block(path, None, "6 puzzles gained, 73 survive")] == [
        "the claim '6 puzzles gained'", "the claim '73 survive'"]
    text = "<!-- section:s -->\nthe 2 of 3 tests that survive\n4 lost\n"
    assert unmarked_numbers(text) == {"s": ["the 2 of 3 tests that survive", "4 lost"]}  # outside a marker: fail


def test_a_swapped_label_and_value_fails(tmp_path):
    """Every value of a plain block may be in the file while a label carries another row's value: only a rendered
    table catches that, so tables must be rendered (test_tables_are_rendered_views)."""
    (tmp_path / "r.json").write_text('{"rows": {"topk": 0.173, "jumprelu": 0.207}}')
    (tmp_path / "r.py").write_text("def table(d):\n    return '\\n'.join(['| arch | FVU |', '|---|---|'] + "
                                   "[f'| {k} | {v:.3f} |' for k, v in d['rows'].items()])\n")
    right = "| arch | FVU |\n|---|---|\n| topk | 0.173 |\n| jumprelu | 0.207 |"
    swapped = "| arch | FVU |\n|---|---|\n| topk | 0.207 |\n| jumprelu | 0.173 |"
    renderer, path = (str(tmp_path / "r.py"), "table"), [str(tmp_path / "r.json")]
    assert check_block(path, renderer, right) == []
    assert check_block(path, renderer, swapped)[0].startswith("differs from")
    assert check_block(path, None, swapped) == []  # the plain check cannot tell
    text = f"<!-- section:s -->\n<!-- result:{path[0]} -->\n{swapped}\n\n<!-- result:{path[0]} render={renderer[0]}:table -->\n{right}\n"
    assert handwritten_tables(text) == {"s": 1}


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
