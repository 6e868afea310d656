import pytest
import torch

from dlmscope import DLMScopeError, capture, generate, hooked, run_with_cache
from dlmscope.models.attention import HFAttention

GEN = dict(gen_length=8, steps=4, block_length=8)


def _n_hooks(lm):
    """Hooks left on the model, besides the permanent `HFAttention.keep_resid_pre` ones."""
    return sum(len(m._forward_hooks) + sum(getattr(h, "__func__", None) is not HFAttention.keep_resid_pre
                                           for h in m._forward_pre_hooks.values()) for m in lm.module.modules())


@torch.no_grad()
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


@torch.no_grad()
def test_capture_does_not_change_logits_and_positions_select_rows(llada):
    ids = torch.randint(4, 100, (2, 7))
    base = llada.forward(ids)
    with capture(llada, ["blocks.0.hook_resid_post"], positions=[1, 3]) as cache:
        out = llada.forward(ids)
    torch.testing.assert_close(out, base)
    full = run_with_cache(llada, ids, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"]
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], full[:, [1, 3]].reshape(-1, llada.d_model))


@torch.no_grad()
def test_replace_changes_output_and_identity_does_not(llada):
    ids = torch.randint(4, 100, (2, 7))
    base = llada.forward(ids)
    with hooked(llada, {"blocks.0.hook_resid_post": lambda a, c: a.clone(), "blocks.1.hook_resid_pre": lambda a, c: None}):
        torch.testing.assert_close(llada.forward(ids), base, rtol=0, atol=0)
    with hooked(llada, {"blocks.1.hook_resid_mid": lambda a, c: a * 0}):
        assert (llada.forward(ids) - base).abs().max() > 1e-3
    torch.testing.assert_close(llada.forward(ids), base)  # removed on exit
    assert _n_hooks(llada) == 0


@torch.no_grad()
def test_replace_at_last_layer_touches_only_chosen_positions(llada):
    ids = torch.randint(4, 100, (2, 7))
    name = "blocks.1.hook_resid_post"  # after the last attention: no mixing across positions later
    with capture(llada, [name]) as before:
        base = llada.forward(ids)
    chosen = torch.zeros(2, 7, dtype=torch.bool)
    chosen[0, 2] = chosen[1, 5] = True
    with hooked(llada, {name: lambda a, c: a + 1.0}, positions=chosen):
        with capture(llada, [name]) as after:
            out = llada.forward(ids)
    diff = (after[name] - before[name]).abs().amax(-1)
    assert torch.equal(diff > 0, chosen)
    assert torch.equal((out - base).abs().amax(-1) > 0, chosen)


def test_step_and_position_restriction_inside_the_sampler(llada):
    """An edit at step 1 on masked positions: steps 0 and 1 see exactly the unedited activations elsewhere."""
    name = "blocks.1.hook_resid_post"
    with capture(llada, [name]) as base:
        generate(llada, [[5, 6]], **GEN)
    contexts = []

    def bump(act, ctx):
        contexts.append((ctx.state.step, ctx.state.n_steps, ctx.state.block, ctx.state.t, ctx.positions.clone()))
        return act + 1.0

    with hooked(llada, {name: bump}, steps=[1], positions="masked"):
        with capture(llada, [name]) as edited:
            generate(llada, [[5, 6]], **GEN)
    assert [c[:3] for c in contexts] == [(1, 4, 0)] and contexts[0][3] == 6 / 8
    masked = contexts[0][4]
    assert masked.sum() == 6 and not masked[:, :2].any()  # the prompt is never "masked"
    torch.testing.assert_close(edited.acts[name][0], base.acts[name][0], rtol=0, atol=0)  # step 0 untouched
    diff = (edited.acts[name][1] - base.acts[name][1]).abs().amax(-1)
    assert torch.equal(diff > 0, masked)  # step 1: exactly the masked positions
    assert edited.steps[name] == [0, 1, 2, 3]


def test_callable_steps_and_unmasked_positions(llada):
    rows = []
    with capture(llada, ["blocks.0.hook_resid_post"], steps=lambda s: s % 2 == 1, positions="unmasked") as cache:
        generate(llada, [[5, 6]], **GEN)
    rows = [a.shape[0] for a in cache.acts["blocks.0.hook_resid_post"]]
    assert cache.steps["blocks.0.hook_resid_post"] == [1, 3] and rows == [2 + 2, 2 + 6]


def test_hook_sees_step_and_mask_during_sampling(llada):
    seen = []

    def fn(a, ctx):
        seen.append((ctx.state.step, int(ctx.state.mask.sum()), ctx.name, ctx.layer))

    with hooked(llada, {"blocks.0.hook_resid_post": fn}, steps=[1, 3]):
        generate(llada, [[5, 6]], **GEN)
    assert seen == [(1, 6, "blocks.0.hook_resid_post", 0), (3, 2, "blocks.0.hook_resid_post", 0)]
    with capture(llada, ["blocks.1.hook_resid_post"], positions="masked") as cache:
        generate(llada, [[5, 6]], **GEN)
    assert [a.shape[0] for a in cache.acts["blocks.1.hook_resid_post"]] == [8, 6, 4, 2]
    assert llada.state.step is None and llada.state.mask is None  # reset after sampling
    with hooked(llada, {"blocks.0.hook_resid_post": fn}, steps=[0]):
        n = len(seen)
        llada.forward(torch.tensor([[5, 6]]))  # outside the sampler: no step, so a step filter skips it
        assert len(seen) == n


def test_early_stop_skips_later_layers(llada):
    calls = []
    h = llada.layers[1].register_forward_hook(lambda *a: calls.append(1))
    acts = run_with_cache(llada, torch.randint(4, 100, (1, 5)), ["blocks.0.hook_resid_post", "blocks.0.hook_resid_pre"])
    assert calls == [] and set(acts) == {"blocks.0.hook_resid_post", "blocks.0.hook_resid_pre"}
    run_with_cache(llada, torch.randint(4, 100, (1, 5)), ["blocks.0.hook_resid_post"], stop_early=False)
    h.remove()
    assert calls == [1] and _n_hooks(llada) == 0


def test_hooks_removed_on_exception(llada):
    with pytest.raises(RuntimeError):
        with hooked(llada, {"blocks.0.hook_resid_post": lambda a, c: None}):
            raise RuntimeError("boom")
    assert _n_hooks(llada) == 0

    def explode(a, c):
        raise ValueError("inside the forward")

    with pytest.raises(ValueError, match="inside the forward"):
        with hooked(llada, {"blocks.1.hook_resid_pre": explode}):
            generate(llada, [[5, 6]], **GEN)
    assert _n_hooks(llada) == 0 and llada.state.step is None


def test_bad_hook_arguments(llada):
    with pytest.raises(DLMScopeError, match="out of range"):
        with hooked(llada, {"blocks.7.hook_resid_post": lambda a, c: None}):
            pass
    assert _n_hooks(llada) == 0  # nothing half-installed
    with pytest.raises(DLMScopeError, match="needs the mask state"):
        run_with_cache(llada, torch.tensor([[5, 6]]), ["blocks.0.hook_resid_post"], positions="masked")
    with pytest.raises(DLMScopeError, match="unknown positions"):
        run_with_cache(llada, torch.tensor([[5, 6]]), ["blocks.0.hook_resid_post"], positions="middle")
    with pytest.raises(DLMScopeError, match="position index out of range"):
        run_with_cache(llada, torch.tensor([[5, 6]]), ["blocks.0.hook_resid_post"], positions=[5])
    with pytest.raises(DLMScopeError, match="at least one hook"):
        run_with_cache(llada, torch.tensor([[5, 6]]), [])
    assert _n_hooks(llada) == 0
