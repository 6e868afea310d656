"""Verifiable tasks for RL and decoding-order studies: Sudoku 4x4 and Countdown with three numbers."""

from __future__ import annotations

import ast
import hashlib
import itertools
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Protocol

from .errors import DLMScopeError

SPLITS = ("train", "validation", "test", "pretrain")
# "pretrain" is train and validation together, drawn exactly as "train" was before validation was carved
# out of it: the pool the shipped tiny models (and the fine-tunes of the diffing study) were trained on,
# so those scripts still rebuild their committed data. RL trains on "train" and tunes on "validation".
_RNG_TAG = {"pretrain": "train"}


@dataclass(frozen=True)
class Example:
    """One task instance: the prompt the model sees and the reference answer."""

    prompt: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class Task(Protocol):
    """What RL and decoding-order studies need from a verifiable task."""

    name: str

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` examples of `split` (one of SPLITS), the same for the same seed."""

    def reward(self, example: Example, completion: str) -> float:
        """Score in [0, 1] of the generated text that follows the prompt."""

    def is_correct(self, example: Example, completion: str) -> bool:
        """Whether the completion fully solves the example."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DLMScopeError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


# --------------------------------------------------------------------------------------- Sudoku 4x4

def _valid(grid: tuple[int, ...]) -> bool:
    rows = [grid[4 * r: 4 * r + 4] for r in range(4)]
    cols = [grid[c::4] for c in range(4)]
    boxes = [[grid[4 * (br + i) + bc + j] for i in range(2) for j in range(2)] for br in (0, 2) for bc in (0, 2)]
    return all(sorted(u) == [1, 2, 3, 4] for u in rows + cols + boxes)


@lru_cache(maxsize=1)
def sudoku_grids() -> list[str]:
    """All 288 valid 4x4 Sudoku grids as 16-digit strings."""
    perms = list(itertools.permutations((1, 2, 3, 4)))
    # Row by row with column and box pruning (all 24^4 products would be slow).
    out: list[tuple[int, ...]] = []

    def extend(rows: tuple[int, ...]) -> None:
        if len(rows) == 16:
            if _valid(rows):
                out.append(rows)
            return
        r = len(rows) // 4
        for p in perms:
            cand = rows + p
            if all(len({cand[4 * i + c] for i in range(r + 1)}) == r + 1 for c in range(4)):
                if r % 2 == 1:
                    box_ok = all(len({cand[4 * (r - 1) + bc + j] for j in range(2)} |
                                     {cand[4 * r + bc + j] for j in range(2)}) == 4 for bc in (0, 2))
                    if not box_ok:
                        continue
                extend(cand)

    extend(())
    return ["".join(map(str, g)) for g in out]


def count_solutions(puzzle: str, limit: int = 2) -> int:
    """Number of completions of `puzzle` (0 = empty), stopping at `limit`."""
    cells = [int(c) for c in puzzle]
    count = 0
    for grid in sudoku_grids():
        if all(c == 0 or c == int(g) for c, g in zip(cells, grid)):
            count += 1
            if count >= limit:
                break
    return count


def _split_of_hash(key: str) -> str:
    """1/5 test, 1/5 validation, 3/5 train by a hash of the key (the test fifth is the one it always was)."""
    return {0: "test", 1: "validation"}.get(int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 5, "train")


def _in_split(key: str, split: str) -> bool:
    """Whether `key` belongs to `split` ("pretrain": anything but test)."""
    own = _split_of_hash(key)
    return own != "test" if split == "pretrain" else own == split


def sudoku_split_grids(split: str) -> list[str]:
    """Solution grids of a split (about 3/5 train, 1/5 validation, 1/5 test by grid hash; no grid is in two).

    Validation is for tuning (e.g. RL budgets) without reading the test puzzles. It was carved out of the
    old train split, so the shipped tiny models saw its grids in pretraining, as they saw train's; they
    never saw a test grid."""
    _check_split(split)
    return [g for g in sudoku_grids() if _in_split(g, split)]


class Sudoku:
    """4x4 Sudoku: puzzles with a unique solution; test-split puzzles come from solution grids never in train.

    Prompt "Sudoku: <16 digits, 0 = empty>\nSolution: ", answer the 16-digit solution. Difficulty is
    the number of empty cells, drawn uniformly from min_empty..max_empty (at most 12: a 4x4 puzzle
    needs 4 givens to have one solution).
    """

    name = "sudoku"

    def __init__(self, min_empty: int = 4, max_empty: int = 10):
        if not 1 <= min_empty <= max_empty <= 12:
            raise DLMScopeError(f"empty-cell range {min_empty}..{max_empty} is invalid; need 1 <= min <= max <= 12")
        self.min_empty, self.max_empty = min_empty, max_empty

    @staticmethod
    def prompt(puzzle: str) -> str:
        return f"Sudoku: {puzzle}\nSolution: "

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        _check_split(split)
        grids = sudoku_split_grids(split)
        rng = random.Random(f"sudoku-{_RNG_TAG.get(split, split)}-{seed}")
        out: list[Example] = []
        while len(out) < n:
            grid = rng.choice(grids)
            holes = rng.sample(range(16), rng.randint(self.min_empty, self.max_empty))
            puzzle = "".join("0" if i in holes else c for i, c in enumerate(grid))
            if count_solutions(puzzle) == 1:
                out.append(Example(self.prompt(puzzle), grid, {"puzzle": puzzle, "solution": grid}))
        return out

    @staticmethod
    def _cells(completion: str) -> str:
        return "".join(re.findall(r"[0-9]", completion))[:16]

    def reward(self, example: Example, completion: str) -> float:
        """Fraction of the originally empty cells filled correctly.

        The grid read is the first 16 digits of the completion (other characters are skipped); cells
        the completion does not reach count as wrong, so malformed or short text gets partial credit or 0.
        """
        puzzle, solution = example.meta["puzzle"], example.meta["solution"]
        got = self._cells(completion)
        empty = [i for i, c in enumerate(puzzle) if c == "0"]
        right = sum(1 for i in empty if i < len(got) and got[i] == solution[i])
        return right / len(empty)

    def is_correct(self, example: Example, completion: str) -> bool:
        return self._cells(completion) == example.meta["solution"]


# ------------------------------------------------------------------------------------------ Countdown

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


MAX_EQUATION_CHARS = 100


def evaluate_equation(text: str) -> tuple[Fraction, list[int]] | None:
    """Value and the numbers used of an arithmetic expression over integers with + - * / and brackets.

    Returns None if `text` is not such an expression (other characters, unary minus, powers, over
    MAX_EQUATION_CHARS long, or a division by zero). Only whitelisted `ast` nodes are walked; nothing
    is evaluated as code.
    """
    text = text.strip()
    if not text or len(text) > MAX_EQUATION_CHARS or not re.fullmatch(r"[0-9+\-*/() ]+", text):
        return None
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, RecursionError, MemoryError):
        return None
    numbers: list[int] = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError

    try:
        return ev(tree), numbers
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


class Countdown:
    """Reach the target with each of three numbers exactly once and + - * / (exact fractions).

    Prompt "Countdown: 3 7 25 -> 46\nEquation: ", answer e.g. "25+3*7". Numbers are 1..20, targets
    positive integers up to 200, and every example is solvable (it is built from an equation). Train,
    validation and test are split by a hash of (sorted numbers, target).
    """

    name = "countdown"

    @staticmethod
    def prompt(numbers: list[int], target: int) -> str:
        return f"Countdown: {' '.join(map(str, numbers))} -> {target}\nEquation: "

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        _check_split(split)
        rng = random.Random(f"countdown-{_RNG_TAG.get(split, split)}-{seed}")
        out: list[Example] = []
        while len(out) < n:
            nums = [rng.randint(1, 20) for _ in range(3)]
            a, b, c = rng.sample(nums, 3)
            o1, o2 = rng.choice("+-*/"), rng.choice("+-*/")
            eq = rng.choice([f"{a}{o1}{b}{o2}{c}", f"({a}{o1}{b}){o2}{c}", f"{a}{o1}({b}{o2}{c})"])
            value = evaluate_equation(eq)
            if value is None or value[0].denominator != 1 or not 0 < value[0] <= 200:
                continue
            target = int(value[0])
            if not _in_split(f"{sorted(nums)}-{target}", split):
                continue
            out.append(Example(self.prompt(nums, target), eq, {"numbers": nums, "target": target}))
        return out

    @staticmethod
    def _equation(completion: str) -> str:
        return completion.strip().split("\n")[0].split("=")[0]

    def reward(self, example: Example, completion: str) -> float:
        """1.0 correct equation using each number once; 0.1 well-formed but wrong; 0.0 otherwise.

        The equation is the completion's first line up to an optional "= value".
        """
        parsed = evaluate_equation(self._equation(completion))
        if parsed is None:
            return 0.0
        value, used = parsed
        ok = sorted(used) == sorted(example.meta["numbers"]) and value == example.meta["target"]
        return 1.0 if ok else 0.1

    def is_correct(self, example: Example, completion: str) -> bool:
        return self.reward(example, completion) == 1.0


TASKS = {"sudoku": Sudoku, "countdown": Countdown}


def get_task(name: str, **options) -> Task:
    """A task by name; `options` go to its constructor (e.g. Sudoku's min_empty / max_empty)."""
    if name not in TASKS:
        raise DLMScopeError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name](**options)


def task_corpus(n: int, seed: int = 0) -> list[str]:
    """Pretraining documents (prompt + answer) from every task's pretrain pool, n per task."""
    return [ex.prompt + ex.answer for name in TASKS for ex in get_task(name).examples("pretrain", n, seed)]
