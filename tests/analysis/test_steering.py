import pytest
import torch

from dlmscope import DLMScopeError, generate
from dlmscope.analysis.steering import SteeringSpec, ar_generate, steer, steered_generate, steering_metrics
from dlmscope.hooks import hooked, run_with_cache
from dlmscope.models import load_model

HOOK = "blocks.1.hook_resid_post"


def test_strength_zero_is_identity_at_temperature_zero(llada, tiny_sae):
    prompts = [[5, 6, 7], [8, 9]]
    base = generate(llada, prompts, gen_length=8, steps=8, block_length=8).sequences
    for spec in (SteeringSpec(3, 0.0), SteeringSpec(3, 0.0, mode="direction", positions="masked")):
        with steer(llada, tiny_sae, spec):
            assert torch.equal(generate(llada, prompts, gen_length=8, steps=8, block_length=8).sequences, base)
    with steer(llada, tiny_sae, SteeringSpec(3, 50.0)):
        assert not torch.equal(generate(llada, prompts, gen_length=8, steps=8, block_length=8).sequences, base)


def _steered_deltas(lm, sae, spec, prompts, **kw):
    """Per forward: (step, (B, L) bool of positions the steering hook changed)."""
    before, touched = [], []
    # an earlier hook on the same site sees the activation before steering; a later one after
    with hooked(lm, {HOOK: lambda a, c: before.append(a.clone())}):
        with steer(lm, sae, spec, prompt_length=kw.pop("prompt_length", 0)):
            with hooked(lm, {HOOK: lambda a, c: touched.append((c.state.step, c.state.mask,
                                                                 (a != before[-1]).any(-1)))}):
                out = generate(lm, prompts, **kw)
    return out, touched


def test_schedules_touch_only_chosen_steps_and_positions(llada, tiny_sae):
    kw = dict(gen_length=8, steps=8, block_length=8)
    _, t = _steered_deltas(llada, tiny_sae, SteeringSpec(3, 20.0, "direction", steps="first:0.25", positions="masked"), [[5, 6, 7]], **kw)
    assert [s for s, _, ch in t if ch.any()] == [0, 1]
    assert all(torch.equal(ch, m) for s, m, ch in t if s < 2)  # exactly the still-masked positions
    _, t = _steered_deltas(llada, tiny_sae, SteeringSpec(3, 20.0, "direction", steps=[2, 5], positions="generated"), [[5, 6, 7]],
                           prompt_length=3, **kw)
    assert [s for s, _, ch in t if ch.any()] == [2, 5]
    assert all(not ch[:, :3].any() and ch[:, 3:].all() for s, _, ch in t if s in (2, 5))
    _, t = _steered_deltas(llada, tiny_sae, SteeringSpec(3, 20.0, "direction", positions="top:2"), [[5, 6, 7]], **kw)
    assert all(int(ch.sum()) == 2 for _, _, ch in t)


def test_steering_outside_the_sampler_and_ar_loop(llada, tiny_dirs, tiny_sae):
    ids = torch.randint(4, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    base = run_with_cache(llada, ids, [HOOK], stop_early=False)[HOOK]
    with steer(llada, tiny_sae, SteeringSpec(3, strength=5.0, positions="generated"), prompt_length=6):
        new = run_with_cache(llada, ids, [HOOK], stop_early=False)[HOOK]
    assert torch.equal(new[:, :6], base[:, :6]) and not torch.equal(new[:, 6:], base[:, 6:])
    ar = load_model(tiny_dirs["causal"])
    meta = dict(tiny_sae.cfg.metadata)
    try:
        tiny_sae.cfg.metadata["model_name"] = None
        plain = ar_generate(ar, ["The list"], 6)
        assert steered_generate(ar, tiny_sae, SteeringSpec(3, 0.0), ["The list"], 6) == plain
        assert ar_generate(ar, ["The list"], 6, temperature=1.0, seed=1) == ar_generate(ar, ["The list"], 6, 1.0, 1)
        with pytest.raises(DLMScopeError, match="masked"):
            steered_generate(ar, tiny_sae, SteeringSpec(3, 1.0, positions="masked"), ["The list"], 6)
        m = steering_metrics(llada, tiny_sae, 3,
                             ["The list"], [plain[0] or "x"], {"a": [5, 6], "b": []}, ar_judge=ar, dlm_judge=llada)
        assert m["n_texts"] == 1 and m["perplexity"] > 1 and m["dlm_nll"] > 0 and m["concept_rate"]["b"] == 0
    finally:
        tiny_sae.cfg.metadata.update(meta)


@pytest.mark.parametrize("spec, msg", [
    (SteeringSpec(10_000), "feature 10000 out of range"), (SteeringSpec(-1), "out of range"),
    (SteeringSpec(0, float("inf")), "strength inf is not finite"), (SteeringSpec(0, float("nan")), "not finite"),
    (SteeringSpec(0, positions="odd"), "positions"), (SteeringSpec(0, steps="first:2"), "steps"),
    (SteeringSpec(0, steps=[-1]), "steps"), (SteeringSpec(0, mode="x"), "mode")])
def test_bad_specs_one_line(llada, tiny_sae, spec, msg):
    with pytest.raises(DLMScopeError, match=msg) as e:
        with steer(llada, tiny_sae, spec):
            pass
    assert "\n" not in str(e.value)


def test_empty_prompts_and_foreign_sae(llada, tiny_sae):
    from dlmscope.sae import load_sae

    with pytest.raises(DLMScopeError, match="prompt list is empty"):
        steered_generate(llada, tiny_sae, SteeringSpec(3), [])
    with pytest.raises(DLMScopeError, match="does not match|trained on model|out of range"):
        steered_generate(llada, load_sae("tiny-dlm-L3-k32"), SteeringSpec(3), ["a"])


@pytest.mark.parametrize("mode,scale", [("direction", "max"), ("sae", "fixed"), ("sae", "max")])
def test_exact_delta_added_to_the_residual(llada, tiny_sae, mode, scale):
    """The residual moves by exactly strength * W_dec[f] / input_scale, times max(A) per position for scale=max,
    which is DLM-Scope's decode(A with A[f] += bump) + (h - decode(A)) with the reconstruction error kept."""
    ids = torch.randint(4, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    f, strength = 3, 2.5
    h = run_with_cache(llada, ids, [HOOK], stop_early=False)[HOOK].float()
    with steer(llada, tiny_sae, SteeringSpec(f, strength, mode, scale)):
        steered = run_with_cache(llada, ids, [HOOK], stop_early=False)[HOOK].float()
    with torch.no_grad():
        direction = tiny_sae.W_dec[f] / tiny_sae.input_scale
        A = tiny_sae.encode(h)
        bump = strength * (A.max(-1).values if mode == "sae" and scale == "max" else torch.ones(h.shape[:2]))
        torch.testing.assert_close(steered - h, bump[..., None] * direction, atol=1e-5, rtol=1e-4)
        if mode == "sae":
            edited = A.clone()
            edited[..., f] += bump
            expected = tiny_sae.decode(edited) + (h - tiny_sae.decode(A))
            torch.testing.assert_close(steered, expected, atol=1e-4, rtol=1e-4)
    assert float(tiny_sae.input_scale) != 1.0 and float(bump.min()) > 0  # the scale and max(A) both matter here


def test_step_schedule_must_lie_in_the_run(llada, tiny_sae):
    from dlmscope.analysis.steering import compare, validate

    with pytest.raises(DLMScopeError, match=r"steps=\[2, 8\]: the run has steps 0..7"):
        compare(llada, tiny_sae, SteeringSpec(3, steps=[2, 8]), ["a"], concepts={}, gen_length=8, steps=8)
    validate(SteeringSpec(3, steps=[0, 7]), tiny_sae, llada, n_steps=8)


def test_ar_generated_positions_start_at_each_prompts_own_end(tiny_dirs, tiny_sae):
    """Prompts of different lengths (steered_generate passes the longest): every generated token of each prompt is
    steered, no prompt token is."""
    ar = load_model(tiny_dirs["causal"])
    prompts = ["The list type is a mutable sequence", "The"]
    lengths = [len(ids) for ids in ar.to_tokens(prompts)]
    assert lengths[0] > lengths[1] + 2
    meta = dict(tiny_sae.cfg.metadata)
    before, touched = [], []
    try:
        tiny_sae.cfg.metadata["model_name"] = None
        with hooked(ar, {HOOK: lambda a, c: before.append(a.clone())}):
            with steer(ar, tiny_sae, SteeringSpec(3, 20.0, "direction", positions="generated"), max(lengths)):
                with hooked(ar, {HOOK: lambda a, c: touched.append((c.state.step, (a != before[-1]).any(-1)[0]))}):
                    ar_generate(ar, prompts, 4)
    finally:
        tiny_sae.cfg.metadata.update(meta)
    starts = [i for i, (step, _) in enumerate(touched) if step == 0]
    assert len(starts) == 2 and len(touched) > 4  # one decoding loop per prompt, several tokens each
    for n_prompt, forwards in zip(lengths, (touched[:starts[1]], touched[starts[1]:])):
        for step, changed in forwards:
            assert changed.tolist() == [False] * n_prompt + [True] * step


@torch.no_grad()
def test_transcoder_steering_writes_at_its_output_hook(llada, tiny_transcoder):
    ids = torch.randint(4, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    hooks = ["blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"]
    clean = run_with_cache(llada, ids, hooks, stop_early=False)
    with steer(llada, tiny_transcoder, SteeringSpec(3, 2.0, mode="direction", scale="fixed")):
        steered = run_with_cache(llada, ids, hooks, stop_early=False)
    torch.testing.assert_close(steered[hooks[0]], clean[hooks[0]])
    torch.testing.assert_close(steered[hooks[1]] - clean[hooks[1]], 2.0 * (tiny_transcoder.W_dec[3] / tiny_transcoder.output_scale).expand(1, 8, 64),
                               atol=1e-5, rtol=1e-4)


def _planted_pair(tiny_dirs):
    """The tiny LLaDA and AR models rewired so their layer-0 residual is an embedding (attention and MLP outputs
    zeroed) on text that counts up through tokens 10..41 (token t is always followed by succ(t)). The DLM's residual
    at i is E[x_i]; the AR model's embedding table is shifted by one, so its residual at i is E[x_{i+1}], the next
    token it must predict. Same SAE (latent 0 reads E[20] fully and E[21] at half strength), same final norm and
    unembedding (W_U = E): the same feature with the same readout, planted once on each side."""
    from dlmscope.sae import SAEConfig, build_sae

    pair, d = [], 64
    E = torch.zeros(300, d)
    E[10:42, :32] = 4 * torch.eye(32)
    succ = torch.tensor([10 + (t - 9) % 32 if 10 <= t < 42 else t for t in range(300)])
    for key, table in (("llada", E), ("causal", E[succ])):
        lm = load_model(tiny_dirs[key])
        m = lm.module
        with torch.no_grad():
            m.model.embed_tokens.weight.copy_(table)
            m.lm_head.weight.copy_(E)
            m.model.norm.weight.fill_(1.0)
            for layer in m.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
        pair.append(lm)
    sae = build_sae(SAEConfig(d, 2, 1, "topk", {"hook_name": "blocks.0.hook_resid_post"}))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_enc[10, 0], sae.W_enc[11, 0], sae.W_enc[0, 1] = 1.0, 0.5, 1.0
        sae.W_dec[0, 10], sae.W_dec[0, 11], sae.W_dec[1, 0] = 1.0, 0.5, 1.0
    rows = torch.stack([10 + (torch.arange(32) + 3 * r) % 32 for r in range(8)])
    return pair, sae, rows


def test_planted_feature_gets_one_concept_in_a_causal_and_a_bidirectional_model(tiny_dirs):
    """Output-side and logit concepts agree across the pair; the input-side definition (the old one) does not: it
    reads the AR model one token early (token 19, which precedes the concept 20)."""
    from dlmscope.analysis.steering import concepts_for, input_concept, logit_concept, output_concept

    (dlm, ar), sae, rows = _planted_pair(tiny_dirs)
    assert (dlm.readout_offset, ar.readout_offset) == (0, 1)
    for f in (output_concept, input_concept):  # the planted residuals really are what the docstring says
        assert f(dlm, sae, 0, rows, top=2) == [20, 21]
    assert output_concept(ar, sae, 0, rows, top=2) == [20, 21]
    assert input_concept(ar, sae, 0, rows, top=2) == [19, 20]
    assert logit_concept(dlm, sae, 0, top=2) == logit_concept(ar, sae, 0, top=2) == [20, 21]
    assert concepts_for(dlm, sae, 0, rows, top=2) == concepts_for(ar, sae, 0, rows, top=2)


def test_direct_logits_match_the_models_own_readout(llada):
    """Direct logit attribution of a residual equals the model's logits up to the final norm's per-position scale:
    the same token ranking."""
    h = run_with_cache(llada, torch.tensor([[5, 6, 7, 8]]), ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    logits = llada.forward(torch.tensor([[5, 6, 7, 8]]))
    dla = llada.direct_logits(h)
    scale = h.pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt()
    torch.testing.assert_close(dla * scale, logits.float(), atol=1e-4, rtol=1e-4)


def test_block_models_steer_with_their_own_sampler(tmp_path, tokenizer, one_thread):
    """On a LLaDA 2.x model the steering comparison samples with its block sampler over its own blocks (as
    `generate` does by default), not with one LLaDA block over the generation."""
    from dlmscope.diffusion.blocks import generate_blocks
    from dlmscope.models.tiny import write_tiny_llada2

    lm = load_model(write_tiny_llada2(tmp_path / "l2", vocab_size=len(tokenizer), tokenizer=tokenizer,
                                      mask_id=tokenizer.mask_token_id))
    texts = steered_generate(lm, None, None, ["def f", "x ="], gen_length=8, steps=12)
    assert texts == generate_blocks(lm, ["def f", "x ="], max_new_tokens=8, steps_per_block=4, cache=None).texts
