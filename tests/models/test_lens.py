"""`models.lens`: native models as TransformerLens HookedTransformers and back, exact against the native path."""

import pytest
import torch

from dlmscope import DLMScopeError, generate, hooked, load_model, run_with_cache, to_hooked_transformer
from dlmscope.models.attention import ATTN_SITES
from dlmscope.models.tiny import write_tiny_lladamoe

ATOL = 1e-4  # float32


@pytest.fixture(scope="module")
def pairs(tiny_dirs):
    """family -> (native LoadedModel, HookedTransformer, the HookedTransformer loaded back)."""
    out = {}
    for family in ("llada", "dream", "causal"):
        lm = load_model(tiny_dirs[family])
        ht = to_hooked_transformer(lm)
        out[family] = (lm, ht, load_model(ht, mask_id=lm.mask_id))
    return out


def _batch(lm, left: bool):
    ids = torch.randint(5, lm.vocab_size, (3, 10), generator=torch.Generator().manual_seed(2))
    am = torch.ones_like(ids)
    am[1, 7:] = 0
    am[2, 4:] = 0
    return ids, (am.flip(1) if left else am)


@pytest.mark.parametrize("family", ["llada", "dream", "causal"])
@torch.no_grad()
def test_logits_equal_native_padded_and_unpadded(pairs, family, one_thread):
    lm, ht, back = pairs[family]
    from transformer_lens import HookedTransformer

    assert isinstance(ht, HookedTransformer) and ht.cfg.attention_dir == ("causal" if lm.causal else "bidirectional")
    assert back.family == (family if family != "causal" else "transformer_lens") and back.shift == lm.shift
    ids, _ = _batch(lm, False)
    torch.testing.assert_close(ht(ids), lm.forward(ids), rtol=0, atol=ATOL)
    for left in (False, True):
        ids, am = _batch(lm, left)
        real = am.bool()[..., None]
        if lm.causal:
            got, want = back.forward(ids, am), lm.forward(ids, am)
        else:
            got, want = back.denoise_logits(ids, am), lm.denoise_logits(ids, am)
            torch.testing.assert_close(back.denoise_logits(ids), lm.denoise_logits(ids), rtol=0, atol=ATOL)
        torch.testing.assert_close(got * real, want * real, rtol=0, atol=ATOL)
        if not left:  # TransformerLens' own call with a padding mask: identical under right padding
            torch.testing.assert_close(ht(ids, attention_mask=am) * real, lm.forward(ids, am) * real, rtol=0, atol=ATOL)


@torch.no_grad()
def test_bidirectional_attention_and_unfolded_weights(pairs, one_thread):
    lm, ht, _ = pairs["llada"]
    ids = torch.randint(5, lm.vocab_size, (1, 8))
    later = ids.clone()
    later[0, -1] = (ids[0, -1] + 1) % lm.vocab_size
    assert (ht(later)[0, 0] - ht(ids)[0, 0]).abs().max() > 1e-4  # a later token changes an earlier position
    attn = lm.layers[0].self_attn
    torch.testing.assert_close(ht.blocks[0].ln1.w, lm.layers[0].input_layernorm.weight)  # not folded
    torch.testing.assert_close(ht.blocks[0].attn.W_Q[1], attn.q_proj.weight[16:32].T)


@pytest.mark.parametrize("family", ["llada", "dream"])
@torch.no_grad()
def test_every_site_matches_the_native_model(pairs, family, one_thread):
    lm, ht, back = pairs[family]
    names = [f"blocks.1.attn.hook_{s}" for s in ATTN_SITES] + [
        f"blocks.1.hook_{s}" for s in ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")]
    assert set(names) <= set(back.hook_names)
    ids, am = _batch(lm, True)
    native = run_with_cache(lm, ids, names, am, stop_early=False)
    ours = run_with_cache(back, ids, names, am, stop_early=False)
    _, tl_cache = ht.run_with_cache(ids)
    unpadded = run_with_cache(back, ids, ["blocks.1.attn.hook_pattern"])
    torch.testing.assert_close(tl_cache["blocks.1.attn.hook_pattern"], unpadded["blocks.1.attn.hook_pattern"])
    real = am.bool()
    for name in names:
        a, b = native[name], ours[name]
        if name.endswith("pattern"):
            a, b = a.transpose(1, 2)[real], b.transpose(1, 2)[real]
        else:
            a, b = a[real], b[real]
        torch.testing.assert_close(b, a, rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("family", ["llada", "dream", "causal"])
@torch.no_grad()
def test_resid_mid_edits_match_transformer_lens(pairs, family, one_thread):
    """TransformerLens' hook_resid_mid is the residual stream itself: the native edit must do the same."""
    lm, _, back = pairs[family]
    ids, _ = _batch(lm, False)
    d = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(5))
    logits = []
    for model in (lm, back):
        with hooked(model, {"blocks.0.hook_resid_mid": lambda a, c: a + d}, positions=[4]):
            logits.append(model.forward(ids))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=ATOL)
    assert (logits[0] - lm.forward(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llada", "dream"])
@torch.no_grad()
def test_generation_is_token_exact_at_temperature_zero(pairs, family, one_thread):
    lm, _, back = pairs[family]
    prompts = [[5, 6, 7, 8, 9], [10, 11]]  # left-padded batch
    for kw in (dict(gen_length=8, steps=8), dict(gen_length=8, steps=4, block_length=4, remasking="random")):
        a = generate(lm, prompts, seed=0, **kw)
        b = generate(back, prompts, seed=0, **kw)
        assert torch.equal(a.sequences, b.sequences)


@torch.no_grad()
def test_steering_and_splicing_run_on_the_hooked_transformer(pairs, tiny_sae, one_thread):
    from dlmscope.analysis.splice import SpliceConfig, splice_eval
    from dlmscope.analysis.steering import SteeringSpec, steered_generate

    lm, _, back = pairs["llada"]
    spec = SteeringSpec(feature=3, strength=4.0)
    kw = dict(gen_length=8, steps=8)
    steered = steered_generate(lm, tiny_sae, spec, ["The list"], **kw)
    assert steered_generate(back, tiny_sae, spec, ["The list"], **kw) == steered
    assert steered != steered_generate(lm, tiny_sae, None, ["The list"], **kw)
    rows = torch.randint(5, lm.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    cfg = SpliceConfig(t_bins=(0.5,), n_seqs=4, batch_size=4)
    a, b = splice_eval(lm, tiny_sae, rows, cfg)["bins"], splice_eval(back, tiny_sae, rows, cfg)["bins"]
    assert a.keys() == b.keys() == {"0.5", "dlmscope"}
    for label in a:
        for cond in ("clean", "sae", "zero", "mean"):
            assert a[label][cond]["ce"] == pytest.approx(b[label][cond]["ce"], abs=1e-4)


def test_bad_inputs(pairs, tiny_dirs, tmp_path, tokenizer):
    lm, ht, _ = pairs["llada"]
    with pytest.raises(DLMScopeError, match="outside the vocabulary"):
        load_model(ht, mask_id=10 ** 6)
    with pytest.raises(DLMScopeError, match="attention is causal"):
        load_model(pairs["causal"][1], mask_id=3)
    assert load_model(tiny_dirs["llada"], mask_id=3).mask_id == 3  # a folder's mask id may be overridden too
    saved, ht.tokenizer = ht.tokenizer, None
    try:
        with pytest.raises(DLMScopeError, match="bidirectional: pass mask_id="):
            load_model(ht)
    finally:
        ht.tokenizer = saved
    with pytest.raises(DLMScopeError, match="n_ctx"):
        to_hooked_transformer(lm, n_ctx=0)
    assert to_hooked_transformer(lm, n_ctx=32).cfg.n_ctx == 32
    moe = load_model(write_tiny_lladamoe(tmp_path / "moe", vocab_size=len(tokenizer), mask_id=tokenizer.mask_token_id))
    with pytest.raises(DLMScopeError, match="to_hooked_transformer: .* lladamoe"):
        to_hooked_transformer(moe)


def test_train_sae_runs_on_the_hooked_transformer(pairs, tmp_path, one_thread):
    from dlmscope.data import builtin_corpus
    from dlmscope.training import TrainSAEConfig, train_sae

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(builtin_corpus("train")[:60]))
    lm, _, back = pairs["llada"]
    runs = {}
    for key, model in (("native", lm), ("lens", back)):
        cfg = TrainSAEConfig(model=lm.name, dataset=str(text), layers="1", site="attn_out", k="4", expansion=2,
                             total_tokens=256 * 4,
                             batch_size=256, buffer_tokens=512, seqs_per_forward=4, context_length=32, eval_tokens=128,
                             eval_every=4, checkpoint_every=4, out=str(tmp_path / key), name="run", progress=False)
        runs[key] = train_sae(cfg, lm=model).metrics["blocks.1.hook_attn_out-k4"]
    assert runs["lens"]["fvu"] == pytest.approx(runs["native"]["fvu"], abs=1e-3) and runs["lens"]["fvu"] < 1.5
