"""Attention hook sites (`models.attention`) on every native family: meanings, edits, masks, caches."""

import pytest
import torch

from dlmscope import DLMScopeError, capture, generate, hooked, load_model, run_with_cache
from dlmscope.models.attention import ATTN_SITES, attention_module
from dlmscope.models.tiny import write_tiny_llada2, write_tiny_lladamoe

FAMILIES = ("llada", "dream", "causal", "lladamoe", "llada2")


@pytest.fixture(scope="module")
def models(tiny_dirs, tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("attn")
    kw = dict(vocab_size=len(tokenizer), tokenizer=tokenizer, mask_id=tokenizer.mask_token_id)
    dirs = {**tiny_dirs, "lladamoe": write_tiny_lladamoe(root / "moe", **kw),
            "llada2": write_tiny_llada2(root / "l2", **kw)}
    return {f: load_model(dirs[f]) for f in FAMILIES}


def _names(i: int) -> list[str]:
    return [f"blocks.{i}.attn.hook_{s}" for s in ATTN_SITES] + [f"blocks.{i}.hook_attn_out"]


def _padded(lm, B=2, L=8):
    ids = torch.randint(5, lm.vocab_size, (B, L), generator=torch.Generator().manual_seed(1))
    am = torch.ones(B, L, dtype=torch.long)
    am[1, 5:] = 0
    return ids, am


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_sites_have_transformer_lens_shapes_and_attn_out_closes_the_residual(models, family, one_thread):
    lm = models[family]
    ids = torch.randint(5, lm.vocab_size, (2, 8))
    got = run_with_cache(lm, ids, _names(1) + ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid"])
    q, k, v, z = (got[f"blocks.1.attn.hook_{s}"] for s in ("q", "k", "v", "z"))
    H, D = q.shape[2], q.shape[3]
    KV = k.shape[2]
    assert q.shape[:2] == (2, 8) and k.shape == v.shape == (2, 8, KV, D) and H % KV == 0 and z.shape == q.shape
    assert got["blocks.1.attn.hook_rot_q"].shape == q.shape and got["blocks.1.attn.hook_rot_k"].shape == k.shape
    assert got["blocks.1.attn.hook_pattern"].shape == (2, H, 8, 8)
    # pre- vs post-rotary: position 0 is rotated by angle 0, later positions are not
    torch.testing.assert_close(got["blocks.1.attn.hook_rot_q"][:, 0], q[:, 0])
    assert (got["blocks.1.attn.hook_rot_k"][:, 3] - k[:, 3]).abs().max() > 1e-4
    torch.testing.assert_close(got["blocks.1.hook_resid_pre"] + got["blocks.1.hook_attn_out"],
                               got["blocks.1.hook_resid_mid"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_pattern_path_matches_fused_attention(models, family, one_thread):
    """Reading the pattern switches to explicit attention: same logits and z as the fused kernel, padded or not."""
    lm = models[family]
    ids, am = _padded(lm)
    for mask in (None, am):
        with capture(lm, ["blocks.0.attn.hook_z"]) as fused:
            base = lm.forward(ids, mask)
        names = ["blocks.0.attn.hook_z", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
        with capture(lm, names) as explicit:
            out = lm.forward(ids, mask)
        torch.testing.assert_close(out, base, rtol=0, atol=1e-4)
        torch.testing.assert_close(explicit["blocks.0.attn.hook_z"], fused["blocks.0.attn.hook_z"], rtol=0, atol=1e-5)


def _allowed(family: str, am: torch.Tensor, L: int) -> torch.Tensor:
    """(B, L, L) bool: keys each query may see under the family's attention and the padding mask."""
    keys = am.bool()[:, None, :].expand(-1, L, -1)
    i = torch.arange(L)
    if family == "causal":
        return keys & (i[None, :] <= i[:, None])
    if family == "llada2":
        block = i // 4
        return (keys & (block[None, :] <= block[:, None])) | torch.eye(L, dtype=torch.bool)
    return keys


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_patterns_are_row_stochastic_over_allowed_keys(models, family, one_thread):
    lm = models[family]
    ids, am = _padded(lm)
    pattern = run_with_cache(lm, ids, ["blocks.1.attn.hook_pattern"], am)["blocks.1.attn.hook_pattern"]
    allowed = _allowed(family, am, ids.shape[1])[:, None]
    real = am.bool()[:, None, :, None]  # padded queries' rows are not read by anything
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern[..., 0]))
    assert float((pattern * (~allowed & real)).abs().max()) == 0.0
    assert float(pattern[..., :5, :5].min()) > 0 or family in ("causal", "llada2")


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_zeroing_a_heads_z_equals_removing_its_output_projection_slice(models, family, one_thread):
    lm = models[family]
    attn = attention_module(lm.layers[0])
    o_proj = attn.o_proj if hasattr(attn, "o_proj") else attn.dense
    ids = torch.randint(5, lm.vocab_size, (2, 8))
    q = run_with_cache(lm, ids, ["blocks.0.attn.hook_q"])["blocks.0.attn.hook_q"]
    D, h = q.shape[-1], 1

    def ablate(z, ctx):
        z = z.clone()
        z[:, :, h] = 0
        return z

    with hooked(lm, {"blocks.0.attn.hook_z": ablate}):
        ablated = lm.forward(ids)
    saved = o_proj.weight[:, h * D:(h + 1) * D].clone()
    o_proj.weight.data[:, h * D:(h + 1) * D] = 0
    try:
        by_hand = lm.forward(ids)
    finally:
        o_proj.weight.data[:, h * D:(h + 1) * D] = saved
    torch.testing.assert_close(ablated, by_hand, rtol=0, atol=1e-5)
    assert (ablated - lm.forward(ids)).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_editing_resid_mid_edits_the_residual_stream(models, family, one_thread):
    """Adding d to resid_mid at p is adding d to attn_out at p: resid_post moves by d plus the MLP's response."""
    lm = models[family]
    ids = torch.randint(5, lm.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    d = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(4))
    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"]
    base = run_with_cache(lm, ids, names, stop_early=False)
    runs = {}
    for site in ("resid_mid", "attn_out"):
        with hooked(lm, {f"blocks.0.hook_{site}": lambda a, c: a + d}, positions=[3]):
            runs[site] = run_with_cache(lm, ids, names, stop_early=False), lm.forward(ids)
    (mid, mid_logits), (out, out_logits) = runs["resid_mid"], runs["attn_out"]
    for name in names:
        torch.testing.assert_close(mid[name], out[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(mid_logits, out_logits, rtol=0, atol=1e-5)
    shift = mid["blocks.0.hook_resid_post"] - base["blocks.0.hook_resid_post"]
    ffn = {k: r["blocks.0.hook_resid_post"] - r["blocks.0.hook_resid_mid"] for k, r in (("mid", mid), ("base", base))}
    mlp = ffn["mid"] - ffn["base"]  # the MLP's response (LLaDA-MoE's shared expert included)
    torch.testing.assert_close(shift[:, 3], d.expand(2, -1) + mlp[:, 3], rtol=0, atol=1e-5)
    torch.testing.assert_close(mid["blocks.0.hook_resid_mid"][:, 3], base["blocks.0.hook_resid_mid"][:, 3] + d)
    torch.testing.assert_close(mid["blocks.0.hook_resid_pre"], base["blocks.0.hook_resid_pre"], rtol=0, atol=0)
    assert mlp[:, 3].abs().max() > 1e-4 and shift[:, [0, 1, 2, 4, 5, 6, 7]].abs().max() == 0


@torch.no_grad()
def test_resid_mid_edits_follow_resid_pre_edits_and_deep_copies(models, one_thread):
    """resid_mid is formed from the residual after a resid_pre edit; a deep copy's layers keep their own resid_pre."""
    import copy

    lm = models["llada"]
    ids = torch.randint(5, lm.vocab_size, (1, 6))
    both = {"blocks.0.hook_resid_pre": lambda a, c: a * 2, "blocks.0.hook_resid_mid": lambda a, c: a + 1.0}
    with hooked(lm, both):
        got = run_with_cache(lm, ids, ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_resid_mid"])
    torch.testing.assert_close(got["blocks.0.hook_resid_mid"],
                               got["blocks.0.hook_resid_pre"] + got["blocks.0.hook_attn_out"] + 1.0)
    twin = copy.deepcopy(lm.module).model.layers[0]
    assert [h.__self__ for h in twin.input_layernorm._forward_pre_hooks.values()] == [twin.self_attn]


@torch.no_grad()
def test_edits_at_positions_and_pre_rotary_keys_reach_the_output(models, one_thread):
    lm = models["llada"]
    ids = torch.randint(5, lm.vocab_size, (2, 8))
    base = lm.forward(ids)
    with capture(lm, ["blocks.1.attn.hook_pattern"], positions=[2, 6]) as rows:
        lm.forward(ids)
    full = run_with_cache(lm, ids, ["blocks.1.attn.hook_pattern"])["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(rows["blocks.1.attn.hook_pattern"], full[:, :, [2, 6]].transpose(1, 2).reshape(4, 4, 8))

    def uniform(p, ctx):
        return torch.full_like(p, 1.0 / p.shape[-1])

    with hooked(lm, {"blocks.1.attn.hook_pattern": uniform}, positions=[3]):
        with capture(lm, ["blocks.1.attn.hook_pattern"]) as seen:  # capture runs after the edit: it sees it
            out = lm.forward(ids)
    changed = (out - base).abs().amax(-1) > 1e-5
    assert changed[:, 3].all() and not changed[:, [0, 1, 2, 4, 5, 6, 7]].any()  # last layer: no later mixing
    torch.testing.assert_close(seen["blocks.1.attn.hook_pattern"][:, :, 3], torch.full((2, 4, 8), 1 / 8))
    with hooked(lm, {"blocks.0.attn.hook_k": lambda k, c: k * 2}):
        assert (lm.forward(ids) - base).abs().max() > 1e-4


@torch.no_grad()
def test_sampler_steps_and_kv_cache_windows(models, one_thread):
    lm = models["llada"]
    prompt = [[5, 6, 7, 8]]
    names = ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z", "blocks.1.attn.hook_rot_k"]
    with capture(lm, names, steps=[2]) as cache:
        generate(lm, prompt, gen_length=8, steps=4, block_length=4)
    assert cache.steps["blocks.1.attn.hook_z"] == [2]
    assert cache["blocks.1.attn.hook_pattern"].shape == (1, 4, 12, 12)
    with capture(lm, names) as cache:
        out = generate(lm, prompt, gen_length=8, steps=4, block_length=4, cache="dual")
    shapes = [tuple(p.shape) for p in cache.acts["blocks.1.attn.hook_pattern"]]
    # block starts refresh the whole sequence; other steps compute the block's 4 queries over kept + window keys
    assert shapes == [(1, 4, 12, 12), (1, 4, 4, 12)] * 2 and out.n_forwards == 4
    assert [tuple(k.shape) for k in cache.acts["blocks.1.attn.hook_rot_k"]] == [(1, 12, 4, 16), (1, 4, 4, 16)] * 2
    for p in cache.acts["blocks.1.attn.hook_pattern"]:
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p[..., 0]))
    # an edit of a suffix key at a block start reaches the next (cached) step only through the kept keys
    kw = dict(gen_length=8, steps=4, block_length=4, cache="dual", keep_logits=True, return_history=True)
    plain = generate(lm, prompt, **kw)
    with hooked(lm, {"blocks.0.attn.hook_rot_k": lambda k, c: k * 3}, steps=[0], positions=[11]):
        edited = generate(lm, prompt, **kw)
    assert torch.equal(edited.history[1].x, plain.history[1].x)
    assert (edited.history[1].logits - plain.history[1].logits).abs().max() > 1e-4
    # resid_mid edits at a cached step's window positions act as attn_out edits there
    runs = []
    for site in ("resid_mid", "attn_out"):
        with hooked(lm, {f"blocks.0.hook_{site}": lambda a, c: a + 1.0}, steps=[1], positions=[5]):
            runs.append(generate(lm, prompt, **kw))
    torch.testing.assert_close(runs[0].history[1].logits, runs[1].history[1].logits, rtol=0, atol=1e-5)
    assert (runs[0].history[1].logits - plain.history[1].logits).abs().max() > 1e-4


@torch.no_grad()
def test_block_model_clean_context_pass(models, one_thread):
    """With `clean=`, the x_t queries attend to the clean earlier blocks (the first L keys) and their own block."""
    lm = models["llada2"]
    x0 = torch.randint(5, lm.vocab_size, (1, 8))
    xt = x0.clone()
    xt[:, [1, 5, 6]] = lm.mask_id
    pattern = run_with_cache(lm, xt, ["blocks.0.attn.hook_pattern"], clean=x0)["blocks.0.attn.hook_pattern"]
    assert pattern.shape == (1, 4, 8, 16)
    block = torch.arange(8) // 4
    clean_ok = block[None, :] < block[:, None]
    own_ok = block[None, :] == block[:, None]
    allowed = torch.cat([clean_ok, own_ok], -1)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(1, 4, 8))
    assert float(pattern[0][:, ~allowed].abs().max()) == 0.0 and float(pattern[0, :, 4:, :4].sum()) > 0


def test_bad_site_names(tiny_dirs):
    lm = load_model(tiny_dirs["llada"])
    with pytest.raises(DLMScopeError, match="out of range"):
        lm.site("blocks.7.attn.hook_z")
    with pytest.raises(DLMScopeError, match=r"unknown hook 'blocks.0.attn.hook_scores'; allowed: .*attn\.hook_pattern"):
        lm.site("blocks.0.attn.hook_scores")  # remote-code models: tests/models/test_loading.py (no internals)


@torch.no_grad()
def test_block_cache_patterns_cover_kept_and_window_keys(models, one_thread):
    """LLaDA 2.x's exact block cache: a step's queries are its window, its keys everything before the window's end."""
    from dlmscope.diffusion.blocks import generate_blocks

    lm = models["llada2"]
    with capture(lm, ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z"]) as cache:
        generate_blocks(lm, [[5, 6, 7, 8, 9, 10]], max_new_tokens=6, steps_per_block=2, cache="block")
    # step 0 computes [0, 8); block 1's refresh computes [4, 12) over kept [0, 4); its next step [8, 12)
    assert [tuple(p.shape[2:]) for p in cache.acts["blocks.0.attn.hook_pattern"]] == [(8, 8), (8, 12), (4, 12)]
    assert [z.shape[1] for z in cache.acts["blocks.0.attn.hook_z"]] == [8, 8, 4]
    last = cache.acts["blocks.0.attn.hook_pattern"][-1][0]  # queries 8..11 (block 2) over keys 0..11
    torch.testing.assert_close(last.sum(-1), torch.ones_like(last[..., 0]))
    assert float(last[:, :, 4:8].sum()) > 0 and last.shape[-1] == 12
