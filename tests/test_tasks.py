import pytest

from dlmscope import DLMScopeError
from dlmscope.tasks import (Countdown, Example, Sudoku, count_solutions, evaluate_equation, get_task,
                            sudoku_grids, sudoku_split_grids, task_corpus)


def test_sudoku_grids_and_puzzles():
    grids = sudoku_grids()
    assert len(grids) == len(set(grids)) == 288
    train_grids, val_grids, test_grids = (sudoku_split_grids(s) for s in ("train", "validation", "test"))
    assert len(train_grids) + len(val_grids) + len(test_grids) == 288 and min(len(val_grids), len(test_grids)) > 40
    assert not set(train_grids) & set(test_grids) and not set(val_grids) & (set(train_grids) | set(test_grids))
    task = get_task("sudoku")
    train, val, test = task.examples("train", 60), task.examples("validation", 60), task.examples("test", 60)
    for e in train + val + test:
        puzzle, solution = e.meta["puzzle"], e.meta["solution"]
        assert count_solutions(puzzle) == 1 and 4 <= puzzle.count("0") <= 10
        assert all(p in "0" + s for p, s in zip(puzzle, solution))
        assert e.prompt == f"Sudoku: {puzzle}\nSolution: " and e.answer == solution and task.reward(e, e.answer) == 1.0
    assert {e.meta["solution"] for e in train} <= set(train_grids)
    assert {e.meta["solution"] for e in test} <= set(test_grids)
    assert {e.meta["solution"] for e in val} <= set(val_grids)
    assert not {e.meta["puzzle"] for e in train} & {e.meta["puzzle"] for e in test}
    assert task.examples("train", 5, seed=3) == task.examples("train", 5, seed=3) != task.examples("train", 5, seed=4)
    hard = Sudoku(min_empty=12, max_empty=12).examples("test", 5)
    assert all(e.meta["puzzle"].count("0") == 12 and count_solutions(e.meta["puzzle"]) == 1 for e in hard)
    assert count_solutions("0" * 16, limit=1000) == 288
    with pytest.raises(DLMScopeError, match="empty-cell range 3..13 is invalid"):
        Sudoku(3, 13)
    with pytest.raises(DLMScopeError, match="unknown split 'dev'"):
        task.examples("dev", 1)


def test_sudoku_reward_edges():
    task = get_task("sudoku")
    ex = Example("", "1234341221434321", {"puzzle": "1030040002001304", "solution": "1234341221434321"})
    assert task.reward(ex, "1234341221434321") == 1.0 and task.is_correct(ex, "1234341221434321")
    assert task.reward(ex, "1234341221434321<|eos|> trailing 999") == 1.0
    assert task.reward(ex, "1 2 3 4\n3 4 1 2\n2 1 4 3\n4 3 2 1") == 1.0  # separators are skipped
    assert task.reward(ex, "") == 0.0 and task.reward(ex, "garbage") == 0.0 and not task.is_correct(ex, "")
    wrong_one = "1334341221434321"  # empty cell 1 wrong
    assert task.reward(ex, wrong_one) == pytest.approx(8 / 9) and not task.is_correct(ex, wrong_one)
    assert task.reward(ex, "1234") == pytest.approx(2 / 9)  # too short: cells 1 and 3 of the 9 empty ones
    assert task.reward(ex, "1030040002001304") == 0.0  # echoing the puzzle fills nothing


def test_countdown_examples():
    task = get_task("countdown")
    train, val, test = (task.examples(s, 40) for s in ("train", "validation", "test"))
    for e in train + val + test:
        nums, target = e.meta["numbers"], e.meta["target"]
        assert e.prompt == f"Countdown: {' '.join(map(str, nums))} -> {target}\nEquation: "
        assert task.reward(e, e.answer) == 1.0 and task.is_correct(e, e.answer)
    prompts = [{e.prompt for e in split} for split in (train, val, test)]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    assert task.examples("test", 5, seed=1) == task.examples("test", 5, seed=1)


def test_countdown_reward_edges():
    task = get_task("countdown")
    ex = Example("", "", {"numbers": [3, 7, 25], "target": 46})
    assert task.reward(ex, "25+3*7") == 1.0 and task.reward(ex, " (7*3)+25 = 46\nmore") == 1.0
    assert task.reward(ex, "25+3+7") == 0.1  # wrong value
    assert task.reward(ex, "25+25-4") == 0.1  # numbers reused / not the given ones
    assert task.reward(ex, "25+7*3*3") == 0.1  # a number used twice
    assert task.reward(ex, "25*3") == 0.1  # a number missing
    assert task.reward(ex, "__import__('os')") == 0.0  # illegal characters
    assert task.reward(ex, "25+3x7") == 0.0 and task.reward(ex, "2**5") == 0.0 and task.reward(ex, "-3+7") == 0.0
    assert task.reward(ex, "25/(7-7)") == 0.0  # division by zero
    assert task.reward(ex, "") == 0.0 and task.reward(ex, "25+(3") == 0.0 and not task.is_correct(ex, "25+3+7")
    assert task.reward(ex, "(" * 300 + "3" + ")" * 300) == 0.0  # too long to parse
    value, used = evaluate_equation("(20-2)/(3+3)")
    assert value == 3 and used == [20, 2, 3, 3]
    assert evaluate_equation("7/2")[0] * 2 == 7  # exact fractions


def test_registry_and_corpus():
    assert isinstance(get_task("sudoku"), Sudoku) and isinstance(get_task("countdown"), Countdown)
    assert get_task("sudoku", min_empty=6, max_empty=6).examples("train", 1)[0].meta["puzzle"].count("0") == 6
    with pytest.raises(DLMScopeError, match="unknown task 'chess'; known: sudoku, countdown"):
        get_task("chess")
    lines = task_corpus(4, seed=1)
    assert len(lines) == 8 and lines == task_corpus(4, seed=1)
    assert sum(line.startswith("Sudoku: ") for line in lines) == 4 and all("\n" in line for line in lines)


def test_pretrain_pool_is_train_and_validation_drawn_as_train_was_before_the_split():
    """The shipped models' corpus (train_zoo, diff_rspo, train_transcoders) must rebuild unchanged: the
    digests are those of `examples("train", 50, seed=3)` and `task_corpus(20, seed=1)` at commit 8ce6fa2,
    before validation was carved out of train."""
    import hashlib

    digest = lambda texts: hashlib.sha1("".join(texts).encode()).hexdigest()[:16]  # noqa: E731
    pool = sudoku_split_grids("train") + sudoku_split_grids("validation")
    assert sorted(sudoku_split_grids("pretrain")) == sorted(pool)
    assert digest(e.prompt + e.answer for e in get_task("sudoku").examples("pretrain", 50, seed=3)) == "dda9d3c6f53331cf"
    assert digest(e.prompt + e.answer for e in get_task("countdown").examples("pretrain", 50, seed=3)) == "cddb75040a8c2dbe"
    assert digest(task_corpus(20, seed=1)) == "b63c295263ac8794"
