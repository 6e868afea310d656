import pytest

from dlmscope import DLMScopeError
from dlmscope.tasks import Example, count_solutions, evaluate_equation, get_task, sudoku_grids


def test_sudoku_grids_and_puzzles():
    assert len(sudoku_grids()) == 288
    task = get_task("sudoku")
    train, test = task.examples("train", 50), task.examples("test", 50)
    assert all(count_solutions(e.meta["puzzle"]) == 1 for e in train + test)
    assert not {e.meta["solution"] for e in train} & {e.meta["solution"] for e in test}
    assert task.examples("train", 5, seed=3) == task.examples("train", 5, seed=3)


def test_sudoku_reward_edges():
    task = get_task("sudoku")
    ex = Example("", "1234341221434321", {"puzzle": "1030040002001304", "solution": "1234341221434321"})
    assert task.reward(ex, "1234341221434321") == 1.0 and task.is_correct(ex, "1234341221434321")
    assert task.reward(ex, "") == 0.0 and task.reward(ex, "garbage") == 0.0
    wrong_one = "1334341221434321"  # empty cell 1 wrong
    assert 0 < task.reward(ex, wrong_one) < 1 and not task.is_correct(ex, wrong_one)
    assert task.reward(ex, "1234") == pytest.approx(2 / 9)  # cells 1 and 3 of the 9 empty ones


def test_countdown_reward_edges():
    task = get_task("countdown")
    ex = Example("", "", {"numbers": [3, 7, 25], "target": 46})
    assert task.reward(ex, "25+3*7") == 1.0
    assert task.reward(ex, "25+3*7 = 46") == 1.0
    assert task.reward(ex, "25+3+7") == 0.1  # wrong value
    assert task.reward(ex, "25+25-4") == 0.1  # numbers reused / not the given ones
    assert task.reward(ex, "25*3") == 0.1  # a number missing
    assert task.reward(ex, "__import__('os')") == 0.0  # illegal characters
    assert task.reward(ex, "25/(7-7)") == 0.0  # division by zero
    assert evaluate_equation("(1+2)*3")[0] == 9
    for e in task.examples("train", 20):
        assert task.reward(e, e.answer) == 1.0


def test_unknown_task():
    with pytest.raises(DLMScopeError, match="unknown task 'chess'; known: sudoku, countdown"):
        get_task("chess")
