"""The planted-feature study: its trigger choice, the check that base + edit is the planted model's forward, and the
found counts and detection limits its README table reads."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import diff_planted  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pick_trigger_takes_the_token_nearest_the_target_share_in_log_ratio():
    tokens = torch.tensor([5] * 50 + [6] * 9 + [7] * 1 + [3] * 40)  # shares 0.5, 0.09, 0.01, 0.4 (3 excluded)
    assert diff_planted.pick_trigger(tokens, 0.012, exclude={3}) == (7, pytest.approx(0.01))
    assert diff_planted.pick_trigger(tokens, 0.4, exclude={3})[0] == 5  # 0.5 is nearer than 0.09 in log ratio
    assert diff_planted.pick_trigger(tokens, 0.4, exclude=set())[0] == 3


def test_base_plus_edit_is_the_planted_models_forward():
    from dlmscope.models import load_model

    lm = load_model("dlmscope-tiny-dlm")
    rows = torch.randint(10, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    rows[0, :4] = 290
    assert diff_planted.check_planted(lm, rows, diff_planted.direction(0, lm.d_model), 290, 50.0) < 1e-3


def _result(found: dict) -> dict:
    """A result file whose crosscoder rule finds the feature in `found[(f, s)]` seeds of 3."""
    cells = {}
    for (f, s), k in found.items():
        for seed in range(3):
            hit = seed < k
            cc = {"found": hit, "best_cos_difference": 0.95 if hit else 0.5, "null_test": {"ks_pvalue": 0.5}}
            cells[f"f{f:g}-s{s:g}-seed{seed}"] = {"crosscoder": cc, "diff_sae": {"found": False},
                                                 "sae_lens": {"found": False}}
    return {"settings": {"frequencies": [0.002, 0.01], "strengths": [0.25, 1.0, 4.0], "seeds": [0, 1, 2]},
            "cells": cells, "triggers": {"0.002": {"share": 0.002}, "0.01": {"share": 0.0107}}}


def test_detection_limit_is_the_smallest_strength_found_in_every_seed_with_all_stronger_ones():
    res = _result({(0.002, 0.25): 3, (0.002, 1.0): 2, (0.002, 4.0): 3,  # a miss at 1: the limit is 4
                   (0.01, 0.25): 0, (0.01, 1.0): 3, (0.01, 4.0): 3})
    limits = diff_planted.detection_limits(res)
    assert limits["crosscoder|0.002"] == 4.0 and limits["crosscoder|0.01"] == 1.0
    assert limits["crosscoder_difference|0.01"] == 1.0 and limits["diff_sae|0.01"] is None
    counts = diff_planted.found_counts(res)
    assert counts["crosscoder|0.002|1"]["found"] == 2 and counts["crosscoder|0.002|1"]["n"] == 3
    assert counts["crosscoder|0.01|0.25"]["rate"][2] == pytest.approx(0.7076, abs=1e-4)  # Clopper-Pearson 0 of 3
    table = diff_planted.readme_table(res)
    assert "| crosscoder: rule (cosine > 0.9, relative norm > 0.9) | 0.0020 | 3/3 [0.29, 1.00] | 2/3 [0.09, 0.99] |" \
        in table


def test_a_missing_seed_gives_no_limit():
    res = _result({(0.002, 4.0): 3, (0.01, 4.0): 3})
    del res["cells"]["f0.01-s4-seed2"]
    limits = diff_planted.detection_limits(res)
    assert limits["crosscoder|0.002"] == 4.0 and limits["crosscoder|0.01"] is None
