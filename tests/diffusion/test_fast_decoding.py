"""Fast-dLLM decoding in the sampler: threshold and block KV cache, golden against upstream Fast-dLLM."""

import json
from pathlib import Path

import pytest
import torch

from dlmscope.diffusion.sampler import generate
from dlmscope.errors import DLMScopeError
from dlmscope.models import load_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _runs():
    return json.loads((FIXTURES / "llada_tiny" / "fast_dllm.json").read_text())["runs"]


@pytest.fixture(scope="module")
def llada_fixture():
    return load_model(FIXTURES / "llada_tiny")


@pytest.fixture(scope="module")
def confident_llada():
    """llada_tiny with its LM head times 16 (exact: a power of two), as the confident fixture runs were made."""
    lm = load_model(FIXTURES / "llada_tiny")
    with torch.no_grad():
        lm.module.lm_head.weight.mul_(16)
    return lm


@pytest.mark.parametrize("run", _runs(), ids=lambda r: "{cache}-th{threshold}-steps{steps}-gen{gen_length}".format(
    **r["settings"]) + f"-p{len(r['prompts'][0])}" + ("-confident" if "head_scale" in r["settings"] else ""))
def test_matches_upstream_fast_dllm(llada_fixture, confident_llada, run, one_thread):
    """Tokens always equal upstream's. Forward counts too, except that a cached upstream run always computes one
    more forward after the block's first (full) one, even when that forward filled the block: we skip it."""
    s = run["settings"]
    lm = confident_llada if s.get("head_scale") == 16 else llada_fixture
    out = generate(lm, run["prompts"], gen_length=s["gen_length"], steps=s["steps"], block_length=s["block_length"],
                   temperature=s["temperature"], remasking=s["remasking"], threshold=s["threshold"], cache=s["cache"],
                   return_history=True)
    assert out.sequences.tolist() == run["output_ids"]
    steps_per_block = [sum(r.block == b for r in out.history) for b in range(s["gen_length"] // s["block_length"])]
    skipped = sum(n == 1 for n in steps_per_block) if s["cache"] else 0
    assert out.n_forwards + skipped == run["nfe"]


def test_fixture_covers_blocks_filled_by_one_forward(confident_llada, one_thread):
    """The confident runs include cached ones where a block fills in its first forward (upstream counts one more)."""
    runs = [r for r in _runs() if r["settings"].get("head_scale") and r["settings"]["cache"]]
    filled = 0
    for run in runs:
        s = run["settings"]
        out = generate(confident_llada, run["prompts"], gen_length=s["gen_length"], steps=s["steps"],
                       block_length=s["block_length"], threshold=s["threshold"], cache=s["cache"])
        filled += run["nfe"] - out.n_forwards
    assert filled >= 8


def test_threshold_one_is_plain_one_token_per_step(llada_fixture, one_thread):
    """No position of a random model reaches confidence 1: the threshold reveals only the best, as 16 plain steps."""
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    plain = generate(llada_fixture, prompts, gen_length=16, steps=16, block_length=8)
    fast = generate(llada_fixture, prompts, gen_length=16, steps=2, block_length=8, threshold=1.0)
    assert fast.sequences.tolist() == plain.sequences.tolist()
    assert fast.n_forwards == plain.n_forwards == 16


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_dream_cache_with_one_step_per_block_is_the_plain_sampler(cache, one_thread):
    """A block of one step runs only the full forward that refreshes the cache: it must equal plain decoding."""
    lm = load_model(FIXTURES / "dream_tiny")
    prompts = [[5, 6, 7, 8, 9], [9, 10, 11]]  # left-padded batch
    plain = generate(lm, prompts, gen_length=16, steps=4, block_length=4)
    cached = generate(lm, prompts, gen_length=16, steps=4, block_length=4, cache=cache)
    assert cached.sequences.tolist() == plain.sequences.tolist()
    # every probability of this random model exceeds 1e-4: each block is revealed by its first forward
    fast = generate(lm, prompts, gen_length=16, steps=16, block_length=8, cache=cache, threshold=1e-4)
    assert not (fast.sequences == lm.mask_id).any() and fast.n_forwards == 2


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
def test_hooks_see_every_step_and_masked_capture_sees_the_window(llada_fixture, cache, one_thread):
    from dlmscope.hooks import capture

    records = []
    with capture(llada_fixture, ["blocks.1.hook_resid_post"], positions="masked") as acts:
        out = generate(llada_fixture, [[5, 6, 7, 8]], gen_length=16, steps=8, block_length=8, cache=cache,
                       threshold=0.0079, callback=records.append)
    assert len(records) == out.n_forwards == len(acts.acts["blocks.1.hook_resid_post"]) > 2
    for rec, a in zip(records, acts.acts["blocks.1.hook_resid_post"]):
        first = rec.step == 0 or rec.block != records[records.index(rec) - 1].block
        seen = rec.mask.clone()
        if cache == "dual" and not first:  # a dual-cached step computes only the block: later blocks unseen
            seen[:, 4 + 8 * (rec.block + 1):] = False
        # prefix caching recomputes the block and everything after it: every masked position, as uncached
        assert a.shape == (int(seen.sum()), 64)


def test_position_selectors_are_cut_to_the_window():
    from dlmscope.hooks import position_mask
    from dlmscope.models.base import ForwardState

    mask = torch.tensor([[False, False, True, True, True, False]])
    state = ForwardState(step=1, mask=mask, window=(2, 5))
    assert position_mask("masked", state, (1, 3), "cpu").tolist() == [[True, True, True]]
    assert position_mask([0, 3, -1], state, (1, 3), "cpu").tolist() == [[False, True, False]]
    assert position_mask(mask, state, (1, 3), "cpu").tolist() == [[True, True, True]]


def test_strategies_hooks_and_steering_compose_with_the_cache(llada, tiny_sae, one_thread):
    from dlmscope.analysis.order import FeatureStability
    from dlmscope.analysis.steering import SteeringSpec, steered_generate

    ids = [[5, 6, 7, 8]]
    for cache in ("prefix", "dual"):
        out = generate(llada, ids, gen_length=16, steps=8, block_length=8, cache=cache, threshold=0.5,
                       remasking=FeatureStability(tiny_sae))
        assert not (out.sequences == llada.mask_id).any()
        cfg = generate(llada, ids, gen_length=16, steps=8, block_length=8, cache=cache, cfg_scale=1.0)  # batch doubled
        assert not (cfg.sequences == llada.mask_id).any() and cfg.n_forwards == 8
    spec = SteeringSpec(3, 50.0, "direction", "fixed", "all", "generated")
    plain = steered_generate(llada, tiny_sae, None, ["The list"], 8, 8, cache="dual")
    steered = steered_generate(llada, tiny_sae, spec, ["The list"], 8, 8, cache="dual")
    assert plain != steered


def test_bad_fast_options(llada, tiny_dirs):
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(DLMScopeError, match=r"threshold=.* must be a finite number in \(0, 1\]"):
            generate(llada, [[5, 6]], gen_length=8, steps=8, threshold=bad)
    with pytest.raises(DLMScopeError, match="'origin' picks them at random"):
        generate(llada, [[5, 6]], gen_length=8, steps=8, threshold=0.9, remasking="origin")
    with pytest.raises(DLMScopeError, match="cache='full'"):
        generate(llada, [[5, 6]], gen_length=8, steps=8, cache="full")
    with pytest.raises(DLMScopeError, match="autoregressive"):
        generate(load_model(tiny_dirs["causal"]), [[5, 6]], gen_length=8, steps=8, cache="prefix")


def test_cli_fast_options(tiny_dirs, capsys):
    from dlmscope.cli import main

    main(["generate", "--model", str(tiny_dirs["llada"]), "--gen-length", "16", "--steps", "16", "--block-length", "8",
          "--threshold", "0.5", "--kv-cache", "dual"])
    assert capsys.readouterr().out.strip()
    for args, message in ((["generate", "--model", str(tiny_dirs["llada"]), "--threshold", "2"], "threshold=2.0 must be a finite number in (0, 1]"),
                          (["generate", "--model", str(tiny_dirs["llada"]), "--kv-cache", "full"], "cache='full'"),
                          (["rspo", "--threshold", "2"], "threshold=2.0 must be a finite number in (0, 1]"),
                          (["rspo", "--kv-cache", "full"], "cache='full'")):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1
    for cmd in (["generate", "--model", str(tiny_dirs["causal"])],
                ["steer", "--sae", "tiny-ar-L3-k32", "--feature", "1", "--model", "dlmscope-tiny-ar"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--kv-cache", "prefix"])
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar of the causal model
        assert e.value.code == 2 and err.startswith("error:") and "autoregressive" in err
