import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.analysis.splice import SpliceConfig, draw_masks, splice_eval
from dlmscope.models import load_model


def _rows(n=8, L=16):
    return torch.randint(4, 200, (n, L), generator=torch.Generator().manual_seed(0))


def test_same_masks_for_every_condition(llada, tiny_sae, monkeypatch):
    seen = []
    real = llada.denoise_logits
    monkeypatch.setattr(llada, "denoise_logits", lambda x, *a, **k: seen.append(x.clone()) or real(x, *a, **k))
    splice_eval(llada, tiny_sae, _rows(8), SpliceConfig(t_bins=(0.3,), n_seqs=8, batch_size=4))
    # per bin and batch: clean, sae, zero, mean see the very same corrupted input
    assert len(seen) == 2 * 2 * 4
    for i in range(0, len(seen), 4):
        assert all(torch.equal(seen[i], seen[i + j]) for j in (1, 2, 3))
        assert (seen[i] == llada.mask_id).any()
    a = draw_masks(llada, _rows(4), 0.5, 0, 1, 0)[2]
    assert torch.equal(a.mask, draw_masks(llada, _rows(4), 0.5, 0, 1, 0)[2].mask)


def test_splice_with_error_is_identity(llada, tiny_sae):
    for positions in ("all", "masked", "visible"):
        r = splice_eval(llada, tiny_sae, _rows(), SpliceConfig(t_bins=(0.3,), positions=positions, n_seqs=8,
                                                               batch_size=4, with_error=True))
        for label in ("0.3", "dlmscope"):
            assert abs(r["bins"][label]["delta_ce"][0]) < 1e-4
    plain = splice_eval(llada, tiny_sae, _rows(), SpliceConfig(t_bins=(0.3,), n_seqs=8, batch_size=4))
    e = plain["bins"]["0.3"]
    assert e["delta_ce"][0] != 0 and e["delta_ce"][1] <= e["delta_ce"][0] <= e["delta_ce"][2]
    assert set(e["recovered"]) == {"zero", "mean"}


@torch.no_grad()
def test_splice_respects_shift_and_causal(tiny_dirs, tiny_sae):
    meta = dict(tiny_sae.cfg.metadata)
    try:
        tiny_sae.cfg.metadata["model_name"] = None
        for family in ("dream", "causal"):
            lm = load_model(tiny_dirs[family])
            r = splice_eval(lm, tiny_sae, _rows(), SpliceConfig(t_bins=(0.5,), n_seqs=4, batch_size=4, with_error=True))
            assert all(abs(b["delta_ce"][0]) < 1e-4 for b in r["bins"].values())
            if family == "dream":
                # Dream's logits are shifted: the clean CE must equal the CE of denoise_logits, not raw forward
                from dlmscope.diffusion.loss import token_ce

                x0, xt, c = draw_masks(lm, _rows(4), 0.5, 0, 0, 0)
                want = ((token_ce(lm.denoise_logits(xt), x0) * c.mask).sum(1) / c.mask.sum(1)).mean()
                assert r["bins"]["0.5"]["clean"]["ce"][0] == pytest.approx(float(want), rel=1e-5)
                raw = ((token_ce(lm.forward(xt), x0) * c.mask).sum(1) / c.mask.sum(1)).mean()
                assert abs(float(raw) - float(want)) > 1e-3
            else:
                assert list(r["bins"]) == ["clean"]
    finally:
        tiny_sae.cfg.metadata.update(meta)


def test_mean_ablation_uses_the_whole_bins_mean(tiny_dirs):
    """AR rows are not corrupted, so the bin (and its mean activation) is the same however it is batched."""
    from dlmscope.sae import SAEConfig, SAE

    ar = load_model(tiny_dirs["causal"])
    sae = SAE(SAEConfig(64, 128, 8, metadata={"model_name": None, "hook_name": "blocks.0.hook_resid_post"}))
    rows = _rows(8)
    rows[:4] = rows[0]  # the first batch is unlike the rest: its mean is not the bin's
    one, four = (splice_eval(ar, sae, rows, SpliceConfig(n_seqs=8, batch_size=b))["bins"]["clean"]["mean"]["ce"][0]
                 for b in (8, 4))
    assert one == pytest.approx(four, rel=1e-5)


def test_splice_bad_input(llada, tiny_sae):
    from dlmscope.sae import load_sae

    with pytest.raises(DLMScopeError, match="does not match|trained on model"):
        splice_eval(llada, load_sae("tiny-dlm-L1-k32"), _rows())
    meta = dict(tiny_sae.cfg.metadata)
    try:
        tiny_sae.cfg.metadata["model_name"] = "some-other-model"
        with pytest.raises(DLMScopeError, match="trained on model 'some-other-model'"):
            splice_eval(llada, tiny_sae, _rows())
        tiny_sae.cfg.metadata.update(meta, hook_name="blocks.9.hook_resid_post")
        with pytest.raises(DLMScopeError, match="blocks.9"):
            splice_eval(llada, tiny_sae, _rows())
    finally:
        tiny_sae.cfg.metadata.update(meta)
    with pytest.raises(DLMScopeError, match="positions"):
        splice_eval(llada, tiny_sae, _rows(), SpliceConfig(positions="odd"))
    with pytest.raises(DLMScopeError, match="no sequences"):
        splice_eval(llada, tiny_sae, _rows()[:0])


@torch.no_grad()
def test_transcoder_splice_replaces_the_mlp_output_by_its_prediction(llada, tiny_transcoder):
    from dlmscope.analysis.splice import splice_hooks
    from dlmscope.hooks import hooked, run_with_cache

    tc, xt = tiny_transcoder, _rows(2)
    mlp_in = run_with_cache(llada, xt, ["blocks.1.hook_mlp_in"])["blocks.1.hook_mlp_in"]
    with hooked(llada, {"blocks.1.hook_mlp_out": lambda act, ctx: tc.reconstruct(mlp_in)}):
        want = llada.denoise_logits(xt)
    with hooked(llada, splice_hooks(tc)):
        got = llada.denoise_logits(xt)
    torch.testing.assert_close(got, want)
    assert (got - llada.denoise_logits(xt)).abs().max() > 1e-4
    r = splice_eval(llada, tc, _rows(), SpliceConfig(t_bins=(0.3,), n_seqs=8, batch_size=4, with_error=True))
    assert abs(r["bins"]["0.3"]["delta_ce"][0]) < 1e-4
