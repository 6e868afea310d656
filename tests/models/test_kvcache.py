"""The block KV cache: a cached step on unchanged input reproduces the full forward on its window."""

import dataclasses
from pathlib import Path

import pytest
import torch

from dlmscope.errors import DLMScopeError
from dlmscope.models import load_model
from dlmscope.models.kvcache import BlockKVCache, check_cache

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module", params=["llada_tiny", "dream_tiny"])
def fixture_lm(request):
    return load_model(FIXTURES / request.param)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("lo", [0, 8])
def test_cached_step_matches_full_forward(fixture_lm, mode, padded, lo, one_thread):
    ids = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 12:] = fixture_lm.mask_id
    attn = torch.ones(2, 20, dtype=torch.long)
    if padded:
        attn[1, :3] = 0
    full = fixture_lm.denoise_logits(ids, attn)
    cache = BlockKVCache(fixture_lm, mode)
    assert torch.equal(cache.refresh(ids, attn, lo, 14), full)
    end = 20 if mode == "prefix" else 14
    assert cache.window == (max(lo - int(fixture_lm.shift), 0), end)  # Dream recomputes one more on the left
    step = cache.step(ids)
    assert step.shape == (2, end - lo, 512)
    real = attn.bool()[:, lo:end]
    torch.testing.assert_close(step[real], full[:, lo:end][real], atol=1e-5, rtol=0)


def test_stale_keys_change_the_window(one_thread):
    """Keys kept from the block start are not refreshed: revealing a suffix token moves nothing under dual."""
    lm = load_model(FIXTURES / "llada_tiny")
    ids = torch.randint(0, 500, (1, 20), generator=torch.Generator().manual_seed(1))
    ids[:, 8:] = lm.mask_id
    attn = torch.ones_like(ids)
    cache = BlockKVCache(lm, "dual")
    cache.refresh(ids, attn, 8, 14)
    edited = ids.clone()
    edited[0, 17] = 7  # outside the dual window
    torch.testing.assert_close(cache.step(edited), cache.step(ids), atol=0, rtol=0)
    assert not torch.allclose(lm.denoise_logits(edited)[:, 8:14], lm.denoise_logits(ids)[:, 8:14])


def test_bad_cache_options():
    lm = load_model(FIXTURES / "llada_tiny")
    check_cache(lm, None)
    with pytest.raises(DLMScopeError, match=r"cache='full'; allowed: prefix, dual"):
        check_cache(lm, "full")
    for family in ("masked_lm", "llada"):  # a BERT-style model, or LLaDA on the remote backend: no kv_call
        other = dataclasses.replace(lm, family=family, kv_call=None)
        with pytest.raises(DLMScopeError, match="needs a native LLaDA or Dream model") as e:
            check_cache(other, "prefix")
        assert "\n" not in str(e.value)
