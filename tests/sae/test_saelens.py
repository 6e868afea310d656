"""SAELens' own classes run on our SAEs (`dlmscope.to_sae_lens`) and come back (`dlmscope.from_sae_lens`)."""

import pytest
import torch

import dlmscope
from dlmscope import DLMScopeError
from dlmscope.sae import ARCHITECTURES

SAELENS_CLASS = {"topk": "TopKSAE", "batchtopk": "JumpReLUSAE", "jumprelu": "JumpReLUSAE", "matryoshka": "JumpReLUSAE",
                 "transcoder": "JumpReLUTranscoder", "skip_transcoder": "JumpReLUSkipTranscoder"}


def test_every_architecture_has_a_saelens_class():
    assert set(SAELENS_CLASS) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", list(SAELENS_CLASS))
def test_saelens_code_encodes_and_decodes_like_ours(make_trainer, raw_x, arch):
    from sae_lens import SAE

    ours = make_trainer(arch).sae
    assert float(ours.input_scale) != 1.0  # the conversion must fold it in
    theirs = dlmscope.to_sae_lens(ours)
    assert isinstance(theirs, SAE) and type(theirs).__name__ == SAELENS_CLASS[arch]
    assert theirs.cfg.metadata.hook_name == ours.cfg.hook_name and theirs.cfg.metadata.model_name == "m"
    with torch.no_grad():
        f = theirs.encode(raw_x)
        assert int((f > 0).sum()) > 0
        torch.testing.assert_close(f, ours.encode(raw_x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(f), ours.decode(ours.encode(raw_x)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(raw_x), ours.reconstruct(raw_x), atol=1e-5, rtol=1e-5)
    back = dlmscope.from_sae_lens(theirs)
    assert type(back) is type(ours) and back.cfg.k == ours.cfg.k and back.cfg.prefix_sizes == ours.cfg.prefix_sizes
    assert back.cfg.hook_name_out == ours.cfg.hook_name_out
    torch.testing.assert_close(back.encode(raw_x), ours.encode(raw_x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.reconstruct(raw_x), ours.reconstruct(raw_x), atol=1e-5, rtol=1e-5)


def test_shipped_sae_runs_in_saelens():
    sae = dlmscope.load_sae("tiny-dlm-L1-k32")
    theirs = dlmscope.to_sae_lens(sae)
    x = torch.randn(5, sae.cfg.d_in, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)


def test_saelens_own_topk_with_decoder_norm_rescaling_comes_back(raw_x):
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    theirs = TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=4, rescale_acts_by_decoder_norm=True,
                                   apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
        ours = dlmscope.from_sae_lens(theirs)
        torch.testing.assert_close(ours.encode(raw_x), theirs.encode(raw_x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.reconstruct(raw_x), theirs.decode(theirs.encode(raw_x)), atol=1e-4, rtol=1e-4)


def test_from_sae_lens_refuses_other_objects_and_architectures():
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    with pytest.raises(DLMScopeError, match="needs a sae_lens.SAE, not dict"):
        dlmscope.from_sae_lens({})
    with pytest.raises(DLMScopeError, match="architecture 'standard' is not supported"):
        dlmscope.from_sae_lens(StandardSAE(StandardSAEConfig(d_in=16, d_sae=64)))
