"""Remasking strategies (`dlmscope.diffusion.remasking`): their scores by hand and the position picks."""

import pytest
import torch

from dlmscope.diffusion.remasking import StepInput, get_remasking, top_n_mask
from dlmscope.diffusion.sampling import TokenSampling


def test_top_n_mask_per_row():
    score = torch.tensor([[0.1, 0.9, 0.5, float("-inf")], [0.3, 0.2, 0.1, 0.0]])
    assert top_n_mask(score, torch.tensor([2, 0])).tolist() == [[False, True, True, False], [False] * 4]
    assert top_n_mask(score, torch.tensor([0, 0])).sum() == 0


def _step_input(logits, generator=None):
    """A StepInput over (B, L, V) logits: every position a candidate (strategies that only score ignore the rest)."""
    B, L, _ = logits.shape
    x = torch.zeros(B, L, dtype=torch.long)
    return StepInput(None, x, logits, logits.argmax(-1), torch.ones(B, L, dtype=torch.bool), 0, 1, 0, 1, generator)


def test_topk_margin_and_entropy_scores_by_hand():
    import math

    ln = math.log
    # softmax rows: (1/6, 1/3, 1/2), (1/4, 1/4, 1/2), uniform (1/3 each), (0, 0, 1) up to exp(-50)
    logits = torch.tensor([[[0.0, ln(2), ln(3)], [0.0, 0.0, ln(2)], [5.0, 5.0, 5.0], [-50.0, -50.0, 0.0]]],
                          dtype=torch.float64)
    s = _step_input(logits)
    margin = get_remasking("topk_margin").scores(s)
    torch.testing.assert_close(margin, torch.tensor([[1 / 2 - 1 / 3, 1 / 2 - 1 / 4, 0.0, 1.0]], dtype=torch.float64))
    neg_entropy = get_remasking("entropy").scores(s)  # Dream's sum p log(p + 1e-10): ~0 certain, ~-log V uniform
    rows = [(1 / 6, 1 / 3, 1 / 2), (1 / 4, 1 / 4, 1 / 2), (1 / 3,) * 3, (0.0, 0.0, 1.0)]
    expected = [sum(p * ln(p + 1e-10) for p in row) for row in rows]
    torch.testing.assert_close(neg_entropy, torch.tensor([expected], dtype=torch.float64), atol=1e-6, rtol=1e-6)  # fp32


def test_origin_scores_are_the_seeded_uniform_draws():
    logits = torch.zeros(2, 5, 7)
    scores = get_remasking("origin").scores(_step_input(logits, torch.Generator().manual_seed(4)))
    expected = torch.rand(10, generator=torch.Generator().manual_seed(4), dtype=torch.float32).view(2, 5)
    assert torch.equal(scores, expected)  # one float32 uniform per candidate, in order, as Dream draws them
    assert ((scores >= 0) & (scores < 1)).all() and scores.unique().numel() == 10  # a random order: no ties


def test_dream_confidences_use_the_tempered_filtered_distribution(llada):
    """maskgit_plus scores softmax(logits / T)[x0] (LLaDA's low_confidence the untempered one); top-k
    renormalises before margin and entropy are taken."""
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    x0 = torch.tensor([[0]])
    cand = torch.tensor([[True]])

    def score(strategy, **kw):
        s = StepInput(llada, x0, logits, x0, cand, 0, 1, 0, 1, None, TokenSampling(**kw))
        return float(get_remasking(strategy).scores(s)[0, 0])

    p = torch.softmax(logits[0, 0], -1)
    p_t = torch.softmax(logits[0, 0] / 2, -1)
    assert score("low_confidence", temperature=2.0) == pytest.approx(float(p[0]), rel=1e-6)
    assert score("maskgit_plus", temperature=2.0) == pytest.approx(float(p_t[0]), rel=1e-6)
    assert score("maskgit_plus") == pytest.approx(float(p[0]), rel=1e-6)
    p2 = torch.softmax(logits[0, 0, :2], -1)  # top_k=2 keeps two tokens
    assert score("topk_margin", top_k=2) == pytest.approx(float(p2[0] - p2[1]), rel=1e-6)
    assert score("entropy", top_k=2) == pytest.approx(float((p2 * torch.log(p2 + 1e-10)).sum()), rel=1e-6)
    assert score("maskgit_plus", top_p=0.5) == pytest.approx(1.0)  # top token alone carries > 0.5
