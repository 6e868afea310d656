import pytest
import torch

from dlmscope import DLMScopeError, generate
from dlmscope.analysis.order import (FeatureStability, feature_dynamics, jaccard, make_strategy, order_log_likelihood,
                                     order_metrics)


def test_order_metrics_on_hand_made_trajectory():
    assert float(jaccard(torch.tensor([[0, 1]]), torch.tensor([[1, 2]]), 4)[0]) == pytest.approx(1 / 3)
    # two positions (S=4 steps, B=1, k=2): position 0 decoded by step 1, position 1 by step 2
    sets = torch.tensor([[[[0, 1], [0, 1]]], [[[0, 1], [1, 2]]], [[[0, 2], [1, 2]]], [[[2, 3], [1, 2]]]])
    masks = torch.tensor([[[True, True]], [[True, True]], [[False, True]], [[False, False]]])
    m = order_metrics(sets, masks, 4)
    # consecutive masked pairs: pos0 0->1 (J=1); pos1 0->1 (J=1/3), 1->2 (J=1)
    assert m["pre_mask_stability"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert m["pre_mask_stability_per_position"] == pytest.approx([1.0, 2 / 3])
    # pos0 decoded at step 1 with {0,1}: later {0,2} (J=1/3), {2,3} (J=0) -> drift 1 - 1/6; pos1 at step 2: J=1 -> 0
    assert m["post_decode_drift_per_position"] == pytest.approx([1 - 1 / 6, 0.0])
    assert m["post_decode_drift"] == pytest.approx((1 - 1 / 6) / 2)
    assert m["unique_features_per_step"] == [2, 3, 3, 3]
    assert m["decoded_at_step_mean"] == [1.0, 2.0]


def test_sae_stability_strategy_returns_valid_transfers(llada, tiny_sae):
    strat = FeatureStability(tiny_sae)
    out = generate(llada, [[5, 6], [7, 8, 9]], gen_length=8, steps=4, block_length=8, remasking=strat,
                   return_history=True)
    assert not (out.generated == llada.mask_id).any()
    for rec in out.history:
        assert rec.transfer.sum(1).tolist() == [2, 2] and (rec.transfer <= rec.mask).all()
        assert not rec.transfer[:, : out.prompt_length].any()
    assert strat._ctx is None  # hooks removed after sampling


def test_feature_dynamics_and_order_likelihood(llada, tiny_sae):
    d = feature_dynamics(llada, [tiny_sae], [[5, 6, 7]], "low_confidence", gen_length=8, steps=8)
    m = d["layers"]["blocks.1.hook_resid_post"]
    assert 0 <= m["pre_mask_stability"] <= 1 and len(m["unique_features_per_step"]) == 8
    rows = torch.randint(4, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    full = order_log_likelihood(llada, rows, 4, "low_confidence", 8)
    one = order_log_likelihood(llada, rows, 4, make_strategy("sae_stability", tiny_sae), 1)
    assert full.shape == (3,) and (full > 0).all()
    # one step scores every answer token from the fully masked input: the mean masked CE
    from dlmscope.diffusion.loss import token_ce

    x = rows.clone()
    x[:, 4:] = llada.mask_id
    assert torch.allclose(one, token_ce(llada.denoise_logits(x), rows)[:, 4:].mean(1), atol=1e-5)
    with pytest.raises(DLMScopeError, match="steps=9"):
        order_log_likelihood(llada, rows, 4, "entropy", 9)
    with pytest.raises(DLMScopeError, match="unknown remasking"):
        make_strategy("nope")
    with pytest.raises(DLMScopeError, match="prompt list is empty"):
        feature_dynamics(llada, tiny_sae, [], "entropy")


def test_order_likelihood_follows_the_schedule(tiny_dirs):
    """Teacher-forced order likelihood reveals by the sampler's schedule: the family's own unless given."""
    from dlmscope import load_model

    dream = load_model(tiny_dirs["dream"])
    rows = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    own = order_log_likelihood(dream, rows, 4, "low_confidence", 3)  # 8 tokens: dream 2, 2, 4; linear 3, 3, 2
    assert torch.equal(own, order_log_likelihood(dream, rows, 4, "low_confidence", 3, schedule="dream"))
    assert not torch.allclose(own, order_log_likelihood(dream, rows, 4, "low_confidence", 3, schedule="linear"))
