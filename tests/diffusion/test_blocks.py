"""LLaDA 2.x block sampler: token for token (and reveal count per step) against upstream dllm LLaDA2Sampler."""

import json
from pathlib import Path

import pytest
import torch

from dlmscope.diffusion.blocks import generate_blocks
from dlmscope.diffusion.sampler import block_bounds, generate
from dlmscope.errors import DLMScopeError
from dlmscope.hooks import capture
from dlmscope.models import load_model

FIXTURE = Path(__file__).parent.parent / "fixtures" / "llada2_tiny"
RUNS = json.loads((FIXTURE / "generate.json").read_text())["runs"]


@pytest.fixture(scope="module")
def lm():
    return load_model(FIXTURE)


def _revealed(out, mask_id):
    first = out.history[0]
    counts = [(first.x != mask_id).sum(1).tolist()]
    counts += [((h.x != mask_id) | h.transfer).sum(1).tolist() for h in out.history]
    return counts


@pytest.mark.parametrize("cache", ["block", None])
@pytest.mark.parametrize("run", RUNS, ids=lambda r: "P{prompt_length}-new{max_new_tokens}-spb{steps_per_block}-"
                         "th{threshold}-mt{minimal_topk}".format(**r["settings"]))
def test_matches_upstream_sampler(lm, run, cache):
    s = run["settings"]
    out = generate_blocks(lm, run["prompts"], max_new_tokens=s["max_new_tokens"], steps_per_block=s["steps_per_block"],
                          threshold=s["threshold"], minimal_topk=s["minimal_topk"], cache=cache, return_history=True)
    assert out.sequences.tolist() == run["output_ids"]
    assert _revealed(out, lm.mask_id) == run["revealed_per_step"]


def test_block_bounds_follow_the_model_blocks():
    assert block_bounds(6, 8, 4, aligned=True) == [(6, 8), (8, 12), (12, 16)]  # prompt ends inside block 1
    assert block_bounds(8, 5, 4, aligned=True) == [(8, 12), (12, 16)]  # the last block is filled
    assert block_bounds(6, 8, 4, aligned=False) == [(6, 10), (10, 14)]


def test_cached_steps_capture_their_window(lm):
    """With the block cache a step computes only its window; hooks see that window and positions map into it."""
    name = "blocks.1.hook_resid_post"
    with capture(lm, [name], positions="masked") as cache:
        out = generate_blocks(lm, [[1, 2, 3, 4, 5, 6]], max_new_tokens=6, steps_per_block=2, cache="block",
                              return_history=True)
    assert [int(h.mask.sum()) for h in out.history] == [6, 4, 2]  # block (6, 8) fills in one step, then (8, 12)
    # step 0 computes [0, 8): masked 6, 7; block 1's refresh computes [4, 12) on the kept keys/values of
    # [0, 4): masked 8..11; its second step computes [8, 12): the 2 still masked
    assert [a.shape[0] for a in cache.acts[name]] == [2, 4, 2]
    with pytest.raises(DLMScopeError, match="block_length=0 must be an integer >= 1"):
        generate(lm, [[1, 2]], gen_length=8, steps=8, block_length=0)
    with pytest.raises(DLMScopeError, match="cache='prefix' approximates"):
        generate(lm, [[1, 2]], gen_length=8, steps=8, cache="prefix")
    with pytest.raises(DLMScopeError, match="minimal_topk=9"):
        generate_blocks(lm, [[1, 2]], max_new_tokens=8, minimal_topk=9)
    with pytest.raises(DLMScopeError, match="not a block-diffusion model"):
        generate_blocks(load_model(FIXTURE.parent / "lladamoe_tiny"), [[1, 2]])


def test_generate_runs_the_block_sampler_by_default(lm, one_thread):
    """dlmscope.generate on a block model is LLaDA 2.x's own sampler: every upstream run, steps over all blocks."""
    for run in RUNS:
        s = run["settings"]
        n_blocks = len(block_bounds(s["prompt_length"], s["max_new_tokens"], 4, aligned=True))
        steps = min(s["steps_per_block"], s["max_new_tokens"] // s["minimal_topk"])
        out = generate(lm, run["prompts"], gen_length=s["max_new_tokens"], steps=steps * n_blocks,
                       threshold=s["threshold"])
        assert out.sequences.tolist() == run["output_ids"]


def test_block_length_is_an_argument_and_the_attention_follows_it(lm, one_thread):
    """generate_blocks(block_length=8) on a block-4 checkpoint equals the checkpoint loaded with block_size=8;
    changing lm.block_size after loading changes the attention (it is read at each call) or is refused."""
    eight = load_model(FIXTURE, block_size=8)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    a = generate_blocks(lm, prompts, max_new_tokens=10, steps_per_block=4, block_length=8)
    b = generate_blocks(eight, prompts, max_new_tokens=10, steps_per_block=4)
    assert a.sequences.tolist() == b.sequences.tolist() and a.sequences.shape[1] == 16 and lm.block_size == 4
    ids = torch.tensor(prompts)
    four = lm.forward(ids)
    lm.block_size = 8
    try:
        assert torch.equal(lm.forward(ids), eight.forward(ids)) and not torch.allclose(four, eight.forward(ids))
    finally:
        lm.block_size = 4
    assert torch.equal(lm.forward(ids), four)
    with pytest.raises(DLMScopeError, match="block_size=0 is invalid"):
        lm.block_size = 0
    with pytest.raises(DLMScopeError, match="block_size=None is invalid"):
        lm.block_size = None


def test_forward_is_block_causal_and_the_bidirectional_view_is_named(lm):
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    full = lm.forward_bidirectional(ids)
    assert torch.equal(full, load_model(FIXTURE, block_size=8).forward(ids)) and lm.block_size == 4
    other = ids.clone()
    other[0, 4:] = torch.tensor([9, 10, 11, 12])  # a different second block
    assert torch.allclose(lm.forward(ids)[:, :4], lm.forward(other)[:, :4], atol=1e-5)  # block 0 never sees block 1
    assert not torch.allclose(full[:, :4], lm.forward_bidirectional(other)[:, :4])
