import pytest
import torch

from dlmscope import capture, generate, hooked, run_with_cache


def _n_hooks(lm):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.module.modules())


def test_capture_matches_manual_hook(llada):
    ids = torch.randint(4, 100, (2, 7))
    seen = {}
    h = llada.layers[1].register_forward_hook(lambda m, a, o: seen.setdefault("x", o[0] if isinstance(o, tuple) else o))
    llada.forward(ids)
    h.remove()
    got = run_with_cache(llada, ids, ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
    torch.testing.assert_close(got["blocks.1.hook_resid_post"], seen["x"])
    torch.testing.assert_close(got["blocks.0.hook_resid_post"], got["blocks.1.hook_resid_pre"])
    assert _n_hooks(llada) == 0


def test_replace_identity_and_positions(llada):
    ids = torch.randint(4, 100, (2, 7))
    base = llada.forward(ids)
    with hooked(llada, {"blocks.0.hook_resid_post": lambda a, c: a.clone()}):
        torch.testing.assert_close(llada.forward(ids), base)
    with hooked(llada, {"blocks.1.hook_resid_post": lambda a, c: a * 0}, positions=[2]):
        out = llada.forward(ids)
    assert (out[:, 2] - base[:, 2]).abs().max() > 0
    with capture(llada, ["blocks.1.hook_resid_post"]) as cache:
        with hooked(llada, {"blocks.0.hook_resid_post": lambda a, c: a * 0}, positions=[2]):
            llada.forward(ids)
    assert _n_hooks(llada) == 0


def test_hooks_removed_on_exception(llada):
    with pytest.raises(RuntimeError):
        with hooked(llada, {"blocks.0.hook_resid_post": lambda a, c: None}):
            raise RuntimeError("boom")
    assert _n_hooks(llada) == 0


def test_step_and_mask_aware_during_sampling(llada):
    seen = []

    def fn(a, ctx):
        seen.append((ctx.state.step, int(ctx.state.mask.sum())))
        return None

    with hooked(llada, {"blocks.0.hook_resid_post": fn}, steps=[1, 3]):
        generate(llada, [[5, 6]], gen_length=8, steps=4, block_length=8)
    assert [s for s, _ in seen] == [1, 3] and seen[0][1] == 6 and seen[1][1] == 2
    with capture(llada, ["blocks.1.hook_resid_post"], positions="masked") as cache:
        generate(llada, [[5, 6]], gen_length=8, steps=4, block_length=8)
    assert [a.shape[0] for a in cache.acts["blocks.1.hook_resid_post"]] == [8, 6, 4, 2]
    assert llada.state.step is None


def test_early_stop_skips_later_layers(llada):
    calls = []
    h = llada.layers[1].register_forward_hook(lambda *a: calls.append(1))
    run_with_cache(llada, torch.randint(4, 100, (1, 5)), ["blocks.0.hook_resid_post"])
    h.remove()
    assert calls == []
