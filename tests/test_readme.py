"""Every code block of README.md, run the way a user runs it: as a notebook, in the repository's root folder.

The README says every command runs in the repository's root folder, so the test copies the repository
(tracked and untracked, not ignored, files) into a temporary folder and runs everything there: Python blocks
in README order in one namespace, like notebook cells (one subprocess); shell blocks line by line through
bash with `dlmscope` from PATH, with small budgets. DLMSCOPE_CACHE points inside the temporary folder too,
and no README block may name a path under /tmp. A statement whose trailing comment states its value is
checked: an expression whose comment starts with a Python literal (`x == y, n  # (True, 16, 2)`, an
explanation may follow after ": "), and a `print(...)` whose comment is exactly what it prints.
A block is named by the README marker above it and its index under that marker: "train-sae/1" is the
second block after `<!-- section:train-sae -->`.

Adding a README block? It runs as written, so usually nothing is needed here. When it is too slow or
cannot run on this machine, add to the tables below (each entry must match something in the README, so
stale entries fail too):
- REWRITES: (regex, replacement) applied in order to every shell line: small budgets, e.g.
  (r"--rl-steps 30\b", "--rl-steps 1"). Keep the command itself; shrink only sizes.
- SKIP: {substring: reason}: shell lines and Python statements containing it are not run.
- SERVE: substrings of shell lines that start a server until stopped: run in the background with $PORT
  set to a free port, checked until /_stcore/health answers "ok", then stopped.
- SLOW: block names that only run with `-m slow`; list a block there only when a fast test runs the same
  commands already (name that test in the comment).
- OTHER_LANGUAGES: {block name: reason} for blocks that are neither python nor bash.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tokenize
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

TRAIN_BUDGET = "--total-tokens 2048 --batch-size 512 --buffer-tokens 4096 --eval-tokens 512 --eval-every 2"
REWRITES = [
    (r"python -m pip install torch==2\.13\.0 -e \. && ", ""),  # installed already: the tests import it
    (r" --total-tokens \d+", ""),  # every train-sae gets TRAIN_BUDGET instead
    (r"dlmscope train-sae(?! --help)", f"dlmscope train-sae {TRAIN_BUDGET}"),
    (r"dlmscope cache --out (\S+)", r"dlmscope cache --out \1 --batches 3 --seqs-per-forward 8"),
    (r"dlmscope eval-splice", "dlmscope eval-splice --n-seqs 4 --t-bins 0.5"),
    (r"dlmscope steer", "dlmscope steer --gen-length 8 --steps 8"),
    (r"--step-budgets 4,8,16", "--step-budgets 4"),
    (r"dlmscope order", "dlmscope order --n 2 --heldout 2"),
    (r"dlmscope stability", "dlmscope stability --n-seqs 2"),
    (r"dlmscope features build", "dlmscope features build --n-seqs 8"),
    (r"dlmscope explore", "dlmscope explore --port $PORT"),
    (r"--through sampler --steps 16", "--through sampler --steps 4"),
]
SKIP = {
    "python -m pytest": "the test suite itself (.ci/run runs this block verbatim in a fresh environment)",
    "/models/LLaDA-8B-Base": "needs the LLaDA-8B checkpoint (and GPUs)",
    'pip install -e ".[app]"': "installs the package; the test environment has the app extra",
    "python experiments/diff_rspo.py": "a full study (tens of CPU-minutes); its results are committed in experiments/results",
    "python experiments/diff_sae_matching.py": "a full study (CPU-hours); its results are committed in experiments/results",
    "python experiments/diff_planted.py": "a full study (about an hour on one CPU thread); results committed",
    "python experiments/diff_dead_latents.py": "a full study (tens of CPU-minutes); results committed",
}
SERVE = ("dlmscope explore",)
SLOW = {  # block -> the fast tests that run the same commands
    "train-sae/0": "tests/test_training.py (train-sae flags, --config, --resume, --help), "
                   "tests/test_activations.py (dlmscope cache), tests/test_training.py::test_train_from_cache",
    "analyses/0": "tests/test_cli.py::test_analysis_commands_smoke (eval-splice, steer, order)",
    "rl/0": "tests/test_cli.py::test_rspo_command_both_algorithms_and_resume, "
            "tests/test_cli.py::test_analysis_commands_smoke (stability)",
    "rl/1": "tests/analysis/test_diffing.py (dlmscope diff --diff-sae end to end through main(); it needs rl/0's checkpoint, slow too)",
    "explorer/0": "tests/apps/test_explorer.py (features build; dlmscope explore launched and browsed)",
}
OTHER_LANGUAGES: dict[str, str] = {}


def readme_blocks() -> list[tuple[str, str, str]]:
    """(name, language, code) of every fenced block, in README order."""
    blocks, marker, index = [], "top", 0
    lines = README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.fullmatch(r"<!-- (?:section:)?([\w-]+) -->", line.strip()):
            marker, index = m.group(1), 0
        elif line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append((f"{marker}/{index}", line[3:].strip(), "\n".join(lines[i + 1:end])))
            index += 1
            i = end
        i += 1
    return blocks


def shell_commands(code: str) -> list[str]:
    """One command per line; backslash continuations joined; blank lines dropped."""
    return [c.strip() for c in code.replace("\\\n", " ").splitlines() if c.strip()]


def skipped(text: str) -> str | None:
    return next((key for key in SKIP if key in text), None)


def rewrite(command: str) -> str:
    for pattern, replacement in REWRITES:
        command = re.sub(pattern, replacement, command)
    return command


def python_statements(code: str) -> list[str]:
    """Top-level statements of a block with their source (SKIP matches whole statements)."""
    return [ast.get_source_segment(code, node) for node in ast.parse(code).body]


BLOCKS = readme_blocks()
SHELL = [(name, code) for name, lang, code in BLOCKS if lang in ("bash", "sh")]


def test_every_block_is_run_or_listed():
    names = [name for name, _, _ in BLOCKS]
    assert len(names) == len(set(names)) and len(BLOCKS) >= 10
    for name, lang, _ in BLOCKS:
        assert lang in ("python", "bash", "sh") or name in OTHER_LANGUAGES, f"README block {name} ({lang!r}) is " \
            "neither run nor listed in OTHER_LANGUAGES"
    assert set(SLOW) <= set(names) and set(OTHER_LANGUAGES) <= set(names)
    shell = [c for _, code in SHELL for c in shell_commands(code)]
    python = [s for _, lang, code in BLOCKS if lang == "python" for s in python_statements(code)]
    for key in SKIP:
        assert any(key in t for t in shell + python), f"SKIP entry {key!r} matches no README command"
    commands = [c for c in shell if not skipped(c)]
    for pattern, _ in REWRITES:
        assert any(re.search(pattern, c) for c in commands), f"REWRITE {pattern!r} matches no README command"
    for key in SERVE:
        assert any(key in c for c in commands), f"SERVE entry {key!r} matches no README command"


def _env(folder: Path) -> dict:
    return {**os.environ, "DLMSCOPE_CACHE": str(folder.parent / "cache"), "PYTHONUNBUFFERED": "1"}


def comments(code: str) -> dict[int, str]:
    """Line number -> the text of the comment ending that line."""
    return {t.start[0]: t.string[1:].strip() for t in tokenize.generate_tokens(io.StringIO(code).readline)
            if t.type == tokenize.COMMENT}


def promise(node: ast.stmt, comment: str | None) -> tuple[str, str] | None:
    """("print", text) or ("value", literal's source) when a statement's trailing comment states what it gives."""
    if comment is None or not isinstance(node, ast.Expr):
        return None
    call = node.value
    if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print":
        return "print", comment
    for text in (comment, comment.split(": ")[0]):
        try:
            ast.literal_eval(text)
            return "value", text
        except (ValueError, SyntaxError):
            continue
    return None


def python_cells() -> list[tuple[str, list[tuple[str, tuple[str, str] | None]]]]:
    """(block name, [(statement source, promise or None)]) for every Python block, SKIP entries left out."""
    cells = []
    for name, lang, code in BLOCKS:
        if lang == "python":
            notes = comments(code)
            cells.append((name, [(ast.get_source_segment(code, node), promise(node, notes.get(node.end_lineno)))
                                 for node in ast.parse(code).body if not skipped(ast.get_source_segment(code, node))]))
    return cells


RUNNER = """
import ast, contextlib, io, json, sys
ns = {"__name__": "__main__"}
for name, statements in json.loads(sys.argv[1]):
    print("### README block", name, flush=True)
    for source, promised in statements:
        code = compile(source, "README.md:" + name, "eval" if promised and promised[0] == "value" else "exec")
        if not promised:
            exec(code, ns)
        elif promised[0] == "value":
            got = eval(code, ns)
            assert got == ast.literal_eval(promised[1]), f"README {name}: {source!r} gives {got!r}; its comment says {promised[1]}"
        else:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                exec(code, ns)
            printed = out.getvalue().strip()
            print(printed)
            assert printed == promised[1], f"README {name}: {source!r} printed {printed!r}; its comment says {promised[1]!r}"
"""


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository as a user has it, in a temporary folder: every file git tracks or would track."""
    dest = tmp_path_factory.mktemp("readme") / "dlmscope"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True)
    if listed.returncode == 0:
        for rel in filter(None, listed.stdout.decode().split("\0")):
            if (ROOT / rel).is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
    else:  # not a git checkout (an unpacked archive): everything but caches and environments
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info",
                                                                    ".pytest_cache", "runs", "stores"))
    return dest


def test_promised_values_are_found():
    found = {source: p[1] for _, statements in python_cells() for source, p in statements if p}
    values = [ast.literal_eval(v) if kind == "value" else v for _, statements in python_cells()
              for _, (kind, v) in ((s, p) for s, p in statements if p)]
    assert (True, 16, 2) in values and [3, 3, 3, 3, 3, 4, 5] in values and "TopKSAE True" in values, found


def test_no_block_writes_outside_its_folder():
    assert not [name for name, _, code in BLOCKS if "/tmp/" in code]


def test_python_blocks_in_order_in_one_namespace(clone):
    cells = python_cells()
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cells)], cwd=clone, env=_env(clone),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.count("### README block") == len(cells)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(command: str, cwd: Path, env: dict, seconds: float = 180) -> None:
    """Start a server command, wait until Streamlit's health check answers, stop its whole process group."""
    port = _free_port()
    log = cwd / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env={**env, "PORT": str(port)}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + seconds
        while time.time() < deadline:
            assert proc.poll() is None, f"{command!r} exited with {proc.returncode}: {log.read_text()[-3000:]}"
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok":
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"{command!r} did not serve on port {port} within {seconds} s: {log.read_text()[-3000:]}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.parametrize("name, code", [pytest.param(n, c, id=n, marks=[pytest.mark.slow] if n in SLOW else [])
                                        for n, c in SHELL])
def test_shell_block(name, code, clone):
    """Every shell block in the copy's root folder, as a user working through the README in one terminal."""
    env = _env(clone)
    for command in shell_commands(code):
        if skipped(command):
            continue
        command = rewrite(command)
        if any(key in command for key in SERVE):
            _serve(command, clone, env)
            continue
        done = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"README {name}: {command!r} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        assert "\r" not in done.stderr, f"README {name}: {command!r} wrote carriage returns into a log"
