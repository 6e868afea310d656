import pytest
import torch

from dlmscope import DLMScopeError, generate
from dlmscope.diffusion import prompts, remasking, sampler, sampling, schedules, stepforward
from dlmscope.diffusion.sampler import REMASKING, Remasking, default_schedule, get_remasking

# Every public name sampler.py defined before it was split by concern: `from dlmscope.diffusion.sampler import X`
# must keep working for each.
OLD_NAMES = (
    "Schedule LinearSchedule DreamSchedule SCHEDULES default_schedule family_sampler one_block get_schedule "
    "transfer_schedule gumbel_argmax TokenSampling DenoiseStep StepInput Remasking top_n_mask sample_n_mask "
    "LowConfidence RandomOrder DreamConfidence MaskgitPlus TopKMargin Entropy Origin REMASKING get_remasking "
    "GenerateOutput left_pad context_limit block_bounds StepForward check_fast_options check_threshold generate"
).split()


def test_old_import_path_keeps_every_name():
    """The split moved definitions; the sampler module re-exports each, the very same object as its new home's."""
    assert set(OLD_NAMES) <= set(sampler.__all__)
    for name in OLD_NAMES:
        others = [getattr(mod, name) for mod in (prompts, remasking, sampling, schedules, stepforward) if name in vars(mod)]
        assert all(obj is getattr(sampler, name) for obj in others), name
    assert sampler.StepForward.__module__ == "dlmscope.diffusion.stepforward"
    assert sampler.SCHEDULES is schedules.SCHEDULES and sampler.REMASKING is remasking.REMASKING
    assert sampler.generate.__module__ == "dlmscope.diffusion.sampler"


@pytest.mark.parametrize("strategy", sorted(REMASKING))
def test_sampler_invariants(llada, strategy):
    """Blocks in order, the linear schedule's count per step, no remasking, a consistent history."""
    gen, block_length, steps = 10, 5, 4  # 2 blocks of 2 steps: 3 then 2 tokens per step
    out = generate(llada, [[5, 6, 7], [8, 9]], gen_length=gen, steps=steps, block_length=block_length,
                   remasking=strategy, return_history=True, seed=0)
    P = out.prompt_length
    assert len(out.history) == steps and [r.step for r in out.history] == list(range(steps))
    revealed = torch.stack([r.transfer for r in out.history]).sum(0)
    assert (revealed[:, P:] == 1).all() and (revealed[:, :P] == 0).all()  # every generated position exactly once
    assert out.attention_mask.tolist() == [[1] * (P + gen), [0] + [1] * (P - 1 + gen)]
    for i, rec in enumerate(out.history):
        assert rec.block == i // 2 and rec.logits is None
        lo, hi = P + rec.block * block_length, P + (rec.block + 1) * block_length
        assert not rec.transfer[:, :lo].any() and not rec.transfer[:, hi:].any()  # only the current block
        assert not rec.mask[:, :lo].any()  # earlier blocks are finished
        assert (rec.transfer <= rec.mask).all()  # only masked positions are revealed: no remasking
        in_block = (torch.arange(P + gen) >= lo) & (torch.arange(P + gen) < hi)
        assert torch.isinf(rec.confidence[~(rec.mask & in_block)]).all()  # candidates: masked, in the block
        assert abs(rec.t - float(rec.mask[:, P:].float().mean())) < 1e-9
        nxt = out.history[i + 1].x if i + 1 < len(out.history) else out.sequences
        assert torch.equal(nxt, torch.where(rec.transfer, rec.x0, rec.x))  # history consistent
        kept = ~rec.mask
        assert torch.equal(nxt[kept], rec.x[kept])  # decoded tokens never change
        if strategy != "origin":  # origin reveals a random number of tokens per step by design
            assert rec.transfer.sum(1).tolist() == [[3, 3], [2, 2]][i % 2]


def test_callback_sees_every_step_with_logits(llada):
    seen = []
    generate(llada, [[5, 6, 7]], gen_length=8, steps=4, block_length=4, callback=seen.append)
    assert [r.step for r in seen] == [0, 1, 2, 3] and all(r.logits.shape == (1, 11, llada.vocab_size) for r in seen)


def test_keep_logits_in_history(llada):
    out = generate(llada, [[5, 6, 7]], gen_length=4, steps=2, block_length=4, return_history=True, keep_logits=True)
    assert all(r.logits is not None for r in out.history)


def test_greedy_is_deterministic_and_sampling_is_seeded(llada):
    kw = dict(gen_length=8, steps=8, block_length=8)
    assert torch.equal(generate(llada, [[5, 6]], **kw).sequences, generate(llada, [[5, 6]], **kw).sequences)
    a = generate(llada, [[5, 6]], temperature=1.0, seed=3, **kw).sequences
    assert torch.equal(a, generate(llada, [[5, 6]], temperature=1.0, seed=3, **kw).sequences)


def test_cfg_runs_and_changes_logits(llada):
    logits = {}
    for cfg in (0.0, 2.0):
        out = generate(llada, [[5, 6, 7]], gen_length=4, steps=4, block_length=4, cfg_scale=cfg,
                       callback=lambda r, cfg=cfg: logits.setdefault(cfg, r.logits))
        assert out.generated.shape == (1, 4)
    assert logits[0.0].shape == logits[2.0].shape and not torch.allclose(logits[0.0], logits[2.0])


def test_batch_rows_are_independent(llada):
    """A left-padded row generates what it generates alone."""
    kw = dict(gen_length=8, steps=8, block_length=4)
    alone = generate(llada, [[8, 9]], **kw).generated
    batched = generate(llada, [[5, 6, 7, 10], [8, 9]], **kw).generated
    assert torch.equal(batched[1:], alone)


def test_custom_strategy_plugs_in(llada):
    class LeftToRight(Remasking):
        name = "l2r"

        def scores(self, s):
            return -torch.arange(s.x.shape[1], dtype=torch.float64).expand(s.x.shape)

    out = generate(llada, [[5, 6]], gen_length=4, steps=4, block_length=4, remasking=LeftToRight(),
                   return_history=True)
    assert [int(r.transfer[0].nonzero()) for r in out.history] == [2, 3, 4, 5]
    assert isinstance(get_remasking("maskgit_plus"), Remasking)


def test_bad_inputs(llada, tiny_dirs):
    from dlmscope import load_model

    cases = [
        (dict(gen_length=10, steps=5, block_length=4), "gen_length=10 is not divisible by block_length=4"),
        (dict(gen_length=8, steps=0, block_length=8), "steps=0 out of range"),
        (dict(gen_length=8, steps=9, block_length=8), "steps=9 out of range"),
        (dict(gen_length=8, steps=3, block_length=4), "steps=3 out of range.*multiple of the number of blocks \\(2\\)"),
        (dict(gen_length=0, steps=1, block_length=1), "gen_length=0"),
        (dict(gen_length=8, steps=8, block_length=8, remasking="best"), "unknown remasking strategy 'best'"),
        (dict(gen_length=8, steps=8, block_length=8, temperature=-1.0), "temperature"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DLMScopeError, match=message) as e:
            generate(llada, [[5]], **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(DLMScopeError, match="prompt list is empty"):
        generate(llada, [], gen_length=8, steps=8, block_length=8)
    with pytest.raises(DLMScopeError, match="autoregressive"):
        generate(load_model(tiny_dirs["causal"]), [[5]], gen_length=8, steps=8, block_length=8)


@pytest.mark.parametrize("gen_length, blocks", [(16, [0] * 4), (24, [0] * 4), (64, [0, 0, 1, 1])])
def test_default_block_length_fits_the_generation(llada, gen_length, blocks):
    """No block_length: 32-token blocks when 32 divides gen_length, else one block (the README's gen_length=16)."""
    out = generate(llada, [[5, 6]], gen_length=gen_length, steps=4, return_history=True)
    assert [r.block for r in out.history] == blocks and out.sequences.shape[1] == 2 + gen_length
# ---------------------------------------------------------------- schedules, Dream options, validation


def test_default_schedule_and_block_length_follow_the_family(llada, tiny_dirs):
    from dlmscope import load_model

    dream = load_model(tiny_dirs["dream"])
    assert (default_schedule(llada), default_schedule(dream)) == ("linear", "dream")
    blocks = lambda lm, gen, **kw: [r.block for r in generate(lm, [[5, 6]], gen_length=gen, steps=gen // 4,  # noqa: E731
                                                               return_history=True, **kw).history]
    assert blocks(llada, 64) == [0] * 8 + [1] * 8  # 32 divides 64: two blocks of 32
    assert blocks(llada, 40) == [0] * 10  # 32 does not divide 40: one block
    assert blocks(dream, 64) == [0] * 16  # Dream has no blocks
    assert blocks(dream, 64, block_length=32) == [0] * 8 + [1] * 8
    counts = [int(r.transfer[0].sum()) for r in generate(dream, [[5, 6]], gen_length=24, steps=6,
                                                         return_history=True).history]
    assert counts == [3, 4, 4, 4, 4, 5]
    counts = [int(r.transfer[0].sum()) for r in generate(dream, [[5, 6]], gen_length=24, steps=6, schedule="linear",
                                                         return_history=True).history]
    assert counts == [4] * 6


def test_top_k_one_and_tiny_top_p_are_greedy(llada):
    kw = dict(gen_length=8, steps=8, block_length=8)
    greedy = generate(llada, [[5, 6]], **kw).sequences
    assert torch.equal(generate(llada, [[5, 6]], temperature=1.5, top_k=1, seed=0, **kw).sequences, greedy)
    assert torch.equal(generate(llada, [[5, 6]], temperature=1.5, top_p=1e-6, seed=0, **kw).sequences, greedy)
    assert not torch.equal(generate(llada, [[5, 6]], temperature=1.5, seed=0, **kw).sequences, greedy)


def test_alg_temp_draws_positions_by_schedule(llada):
    kw = dict(gen_length=12, steps=4, block_length=12, remasking="maskgit_plus", return_history=True)
    top = generate(llada, [[5, 6]], **kw)
    assert torch.equal(generate(llada, [[5, 6]], alg_temp=0.0, **kw).sequences, top.sequences)
    drawn = [generate(llada, [[5, 6]], alg_temp=10.0, seed=s, **kw) for s in (0, 0, 1)]
    assert torch.equal(drawn[0].sequences, drawn[1].sequences)  # seeded
    orders = [[r.transfer[0].nonzero().flatten().tolist() for r in d.history] for d in (top, drawn[0], drawn[2])]
    assert orders[1] != orders[0] or orders[2] != orders[0]  # a hot softmax does not just take the top scores
    for d in drawn:
        assert [int(r.transfer.sum()) for r in d.history] == [3, 3, 3, 3]  # the schedule's counts still hold


def test_origin_reveals_with_the_schedule_fraction(llada):
    """Under `linear` origin reveals 1/(steps left) of the masked positions in expectation, all by the last step."""
    out = generate(llada, [[5, 6]] * 8, gen_length=32, steps=4, block_length=32, remasking="origin",
                   schedule="linear", seed=0, return_history=True)
    first = int(out.history[0].transfer.sum())
    assert 40 < first < 90  # 256 masked, p = 1/4: mean 64, sd 7
    assert not (out.sequences == llada.mask_id).any()


def test_bad_sampler_options_are_one_line(llada):
    cases = [
        (dict(schedule="cosine"), "unknown schedule 'cosine'; allowed: linear, dream"),
        (dict(temperature=float("inf")), "temperature=inf"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(temperature=-0.5), "temperature=-0.5"),
        (dict(cfg_scale=float("nan")), "cfg_scale=nan"),
        (dict(cfg_scale=-1.0), "cfg_scale=-1.0"),
        (dict(top_p=0.0), r"top_p=0.0 .*\(0, 1\]"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(alg_temp=-1.0), "alg_temp=-1.0"),
        (dict(alg_temp=float("inf")), "alg_temp=inf"),
        (dict(alg_temp=float("nan")), "alg_temp=nan"),
        (dict(eps=1.0), "eps=1.0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DLMScopeError, match=message) as e:
            generate(llada, [[5]], gen_length=8, steps=8, **kwargs)
        assert "\n" not in str(e.value)


def test_prompt_past_the_context_fails_before_any_forward(llada):
    limit = llada.module.config.max_position_embeddings
    calls = []
    with pytest.raises(DLMScopeError, match=f"= {limit + 1} tokens exceeds .* context of {limit}") as e:
        generate(llada, [[5] * (limit - 7)], gen_length=8, steps=8, callback=calls.append)
    assert "\n" not in str(e.value) and not calls
