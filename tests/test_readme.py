"""Every code block of README.md, run the way a user runs it.

Python blocks run in README order in one namespace, like notebook cells (one subprocess). Shell blocks
run line by line through bash with `dlmscope` from PATH, all in one temporary folder, with small budgets.
Both get a temporary working folder and DLMSCOPE_CACHE. A block is named by the README marker above it
and its index under that marker: "train-sae/1" is the second block after `<!-- section:train-sae -->`.

Adding a README block? It runs as written, so usually nothing is needed here. When it is too slow or
cannot run on this machine, add to the tables below (each entry must match something in the README, so
stale entries fail too):
- REWRITES: (regex, replacement) applied in order to every shell line: small budgets, e.g.
  (r"--steps 30\b", "--steps 1"). Keep the command itself; shrink only sizes.
- SKIP: {substring: reason}: shell lines and Python statements containing it are not run.
- SERVE: substrings of shell lines that start a server until stopped: run in the background with $PORT
  set to a free port, checked until /_stcore/health answers "ok", then stopped.
- SLOW: block names that only run with `-m slow`; list a block there only when a fast test runs the same
  commands already (name that test in the comment).
- OTHER_LANGUAGES: {block name: reason} for blocks that are neither python nor bash.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

TRAIN_BUDGET = "--total-tokens 2048 --batch-size 512 --buffer-tokens 4096 --eval-tokens 512 --eval-every 2"
REWRITES = [
    (r"python -m pip install torch==2\.13\.0 -e \. && ", ""),  # installed already: the tests import it
    (r" --total-tokens \d+", ""),  # every train-sae gets TRAIN_BUDGET instead
    (r"dlmscope train-sae(?! --help)", f"dlmscope train-sae {TRAIN_BUDGET}"),
    (r"dlmscope cache (\S+)", r"dlmscope cache \1 --batches 3 --seqs-per-forward 8"),
    (r"dlmscope eval-splice", "dlmscope eval-splice --n-seqs 4 --t-bins 0.5"),
    (r"dlmscope steer", "dlmscope steer --gen-length 8 --steps 8"),
    (r"--steps 4,8,16", "--steps 4"),
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
    "python experiments/": "full studies (tens of CPU-minutes); their results are committed in experiments/results",
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


def _env(tmp: Path) -> dict:
    return {**os.environ, "DLMSCOPE_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}


def test_python_blocks_in_order_in_one_namespace(tmp_path):
    cells = []
    for name, lang, code in BLOCKS:
        if lang == "python":
            kept = [s for s in python_statements(code) if not skipped(s)]
            cells.append(f"print('### README block {name}', flush=True)\n"
                         f"exec(compile({chr(10).join(kept)!r}, 'README.md:{name}', 'exec'), ns)")
    script = "ns = {'__name__': '__main__'}\n" + "\n".join(cells)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=600)
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


@pytest.fixture(scope="module")
def shell_dir(tmp_path_factory):
    """One working folder for every shell block, as a user working through the README in one terminal."""
    return tmp_path_factory.mktemp("readme-shell")


@pytest.mark.parametrize("name, code", [pytest.param(n, c, id=n, marks=[pytest.mark.slow] if n in SLOW else [])
                                        for n, c in SHELL])
def test_shell_block(name, code, shell_dir):
    env = _env(shell_dir)
    for command in shell_commands(code):
        if skipped(command):
            continue
        command = rewrite(command)
        if any(key in command for key in SERVE):
            _serve(command, shell_dir, env)
            continue
        done = subprocess.run(["bash", "-c", command], cwd=shell_dir, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"README {name}: {command!r} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        assert "\r" not in done.stderr, f"README {name}: {command!r} wrote carriage returns into a log"
