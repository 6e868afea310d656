"""The RL comparison's statistics: paired to no RL, clustered by solution grid, Holm over the 3 methods; and the
budget search's settings parser."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import rl_budget_search  # noqa: E402
import rl_compare  # noqa: E402

from dlmscope import DLMScopeError  # noqa: E402


def _logs(gain: dict, seeds: int = 2, grids: int = 30, per_grid: int = 4) -> tuple[dict, list[str]]:
    """No RL solves the first half of each grid's puzzles; `gain[algo]` more puzzles per grid are solved after."""
    n = grids * per_grid
    base = [int(i % per_grid < per_grid // 2) for i in range(n)]
    logs = {}
    for algo in rl_compare.ALGOS:
        after = [int(i % per_grid < per_grid // 2 + gain[algo]) for i in range(n)]
        for s in range(seeds):
            logs[f"{algo}-s{s}"] = {"before": {"correct": base, "rewards": [0.5 + 0.5 * c for c in base]},
                                    "after": {"correct": after, "rewards": [0.5 + 0.5 * c for c in after]},
                                    "steps": [{"sample_s": 1.0, "update_s": 2.0, "reward": 0.5}]}
    return logs, [f"g{i // per_grid}" for i in range(n)]


def test_a_method_that_solves_more_puzzles_is_significant_after_holm_and_a_null_one_is_not():
    logs, grids = _logs({"rspo": 1, "spg": 0, "diffu-grpo": -1})
    s = rl_compare.compare(logs, 2, grids)
    assert s["test_grids"] == 30 and s["no RL"]["exact"][0] == pytest.approx(0.5)
    assert s["rspo"]["exact_vs_no_rl"][0] == pytest.approx(0.25) and s["rspo"]["exact_holm"] < 0.01
    assert s["spg"]["exact_vs_no_rl"] == [0.0, 0.0, 0.0] and s["spg"]["exact_holm"] == 1.0
    assert s["diffu-grpo"]["cell_vs_no_rl"][2] < 0 and s["diffu-grpo"]["cell_holm"] < 0.01
    for algo in rl_compare.ALGOS:  # Holm never lowers a p-value
        assert s[algo]["exact_holm"] >= s[algo]["exact_p"] and s[algo]["cell_holm"] >= s[algo]["cell_p"]
    table = rl_compare.readme_table(s, {"settings": {"seeds": 2}})
    rows = table.splitlines()
    assert rows[2].startswith("| no RL | 0.500 [") and "**+0.250 [" in rows[3] and "**" not in rows[4]


def test_budget_search_settings_parse_to_typed_fields():
    assert rl_budget_search.parse_try("algo=spg,lr=3e-4,rl_steps=20,normalise_adv=true") == {
        "algo": "spg", "lr": 3e-4, "rl_steps": 20, "normalise_adv": True}
    with pytest.raises(DLMScopeError, match="'steps' is not an RLConfig field"):
        rl_budget_search.parse_try("steps=3")
