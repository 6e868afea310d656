import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.diffusion.noise import EPS, corrupt, corrupt_exact, sample_t


def test_corrupt_masks_at_p_mask_and_keeps_the_rest():
    x0 = torch.randint(4, 50, (64, 200))
    c = corrupt(x0, 3, torch.full((64,), 0.3), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(c.p_mask, torch.full((64,), (1 - EPS) * 0.3 + EPS))
    assert abs(float(c.mask.float().mean()) - float(c.p_mask[0])) < 0.01
    assert (c.xt[c.mask] == 3).all() and torch.equal(c.xt[~c.mask], x0[~c.mask])


def test_eps_floor_and_scalar_t():
    x0 = torch.randint(4, 50, (8, 1000))
    c = corrupt(x0, 3, 0.0, eps=0.05, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(c.p_mask, torch.full((8,), 0.05)) and c.t.shape == (8,)
    assert 0.03 < float(c.mask.float().mean()) < 0.07  # t = 0 still masks with probability eps
    assert corrupt(x0, 3, 1.0, eps=0.0).mask.all()


def test_keep_first_and_protect():
    x0 = torch.randint(4, 50, (16, 20))
    protect = torch.zeros_like(x0, dtype=torch.bool)
    protect[:, 1:5] = True  # an SFT prompt
    c = corrupt(x0, 3, 1.0, eps=0.0, keep_first=True, protect=protect)
    assert not c.mask[:, :5].any() and c.mask[:, 5:].all()


def test_per_sequence_t_and_seeding():
    x0 = torch.randint(4, 50, (4, 5000))
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    c = corrupt(x0, 3, t, generator=torch.Generator().manual_seed(2))
    rates = c.mask.float().mean(1)
    assert torch.allclose(rates, c.p_mask, atol=0.02)
    again = corrupt(x0, 3, t, generator=torch.Generator().manual_seed(2))
    assert torch.equal(c.mask, again.mask)


def test_sample_t():
    t = sample_t(2000, (0.05, 0.5), generator=torch.Generator().manual_seed(0))
    assert t.shape == (2000,) and t.min() >= 0.05 and t.max() <= 0.5 and t.std() > 0.1
    shared = sample_t(8, per_batch=True, generator=torch.Generator().manual_seed(0))
    assert (shared == shared[0]).all()
    assert torch.equal(sample_t(5, generator=torch.Generator().manual_seed(3)),
                       sample_t(5, generator=torch.Generator().manual_seed(3)))
    for bad in [(0.5, 0.1), (-0.1, 0.5), (0.0, 1.5)]:
        with pytest.raises(DLMScopeError, match="t range"):
            sample_t(4, bad)


def test_corrupt_exact_masks_k_of_eligible():
    x0 = torch.randint(4, 50, (500, 12))
    eligible = torch.zeros_like(x0, dtype=torch.bool)
    eligible[:, 4:] = True  # 8 answer tokens
    e = corrupt_exact(x0, 3, eligible, generator=torch.Generator().manual_seed(0))
    k = e.mask.sum(1)
    assert not e.mask[:, :4].any() and k.min() == 1 and k.max() == 8
    assert torch.allclose(e.p_mask, k.float() / 8)
    assert len(set(k.tolist())) == 8  # k ~ U{1..n}: every value shows up
    with pytest.raises(DLMScopeError, match="eligible"):
        corrupt_exact(x0[:2], 3, torch.zeros(2, 12, dtype=torch.bool))
