import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.sae import SAEConfig
from dlmscope.sae.matryoshka import MatryoshkaSAE


def test_loss_is_the_sum_of_prefix_losses(make_trainer):
    tr = make_trainer("matryoshka", steps=3)
    sae = tr.sae
    assert sae.cfg.prefix_sizes == (4, 16, 64)
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(5)) * 5 + 2
    out = sae(x)
    extra, logs = sae.extra_loss(out, 5, tr.cfg)
    dense, xs = out.latents, out.x
    by_hand = []
    for m in (4, 16, 64):
        kept = torch.zeros_like(dense)
        kept[:, :m] = dense[:, :m]
        by_hand.append((xs - (kept @ sae.W_dec + sae.b_dec)).pow(2).sum(-1).mean())
    full = (out.x - out.recon).pow(2).sum(-1).mean()
    torch.testing.assert_close(full + extra, sum(by_hand))
    torch.testing.assert_close(torch.tensor(logs["mse_prefix_4"]), by_hand[0].detach())
    assert by_hand[0] > by_hand[1] > by_hand[2]


@pytest.mark.parametrize("sizes", [(16, 8), (16, 16), (4, 100), (0, 8)])
def test_bad_prefix_sizes_one_line(sizes):
    with pytest.raises(DLMScopeError, match="prefix sizes") as e:
        MatryoshkaSAE(SAEConfig(16, 64, 4, "matryoshka", {}, sizes))
    assert "\n" not in str(e.value)


def test_width_is_appended_and_prefixes_only_for_matryoshka():
    assert SAEConfig(16, 64, 4, "matryoshka", {}, (8, 32)).prefix_sizes == (8, 32, 64)
    assert SAEConfig(16, 64, 4, "matryoshka", {}, (8, 64)).prefix_sizes == (8, 64)
    with pytest.raises(DLMScopeError, match="matryoshka"):
        SAEConfig(16, 64, 4, "topk", {}, (8, 32))
