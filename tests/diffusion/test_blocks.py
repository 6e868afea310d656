"""LLaDA 2.x block sampler: token for token (and reveal count per step) against upstream dllm LLaDA2Sampler."""

import json
from pathlib import Path

import pytest

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
    with pytest.raises(DLMScopeError, match="block_length=8 is invalid"):
        generate(lm, [[1, 2]], gen_length=8, steps=8, block_length=8)
    with pytest.raises(DLMScopeError, match="cache='prefix' approximates"):
        generate(lm, [[1, 2]], gen_length=8, steps=8, cache="prefix")
    with pytest.raises(DLMScopeError, match="minimal_topk=9"):
        generate_blocks(lm, [[1, 2]], max_new_tokens=8, minimal_topk=9)
    with pytest.raises(DLMScopeError, match="not a block-diffusion model"):
        generate_blocks(load_model(FIXTURE.parent / "lladamoe_tiny"), [[1, 2]])
