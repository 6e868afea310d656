"""LLaDA 2.1's editing sampler, token for token against dllm's `LLaDA21Sampler`.

Golden runs: tests/fixtures/llada2_tiny/generate21.json (see tests/fixtures/README.md)."""

import json
from pathlib import Path

import pytest

from dlmscope.diffusion.editing import generate_editing
from dlmscope.errors import DLMScopeError
from dlmscope.hooks import capture
from dlmscope.models import load_model

FIXTURE = Path(__file__).parents[1] / "fixtures" / "llada2_tiny"
RUNS = json.loads((FIXTURE / "generate21.json").read_text())["runs"]


@pytest.fixture(scope="module")
def lm():
    return load_model(FIXTURE)


@pytest.mark.parametrize("run", RUNS, ids=lambda r: "P{prompt_length}-new{max_new_tokens}-b{block_size}-th{threshold}-"
                         "edit{editing_threshold}-post{max_post_steps}-n{num_to_transfer}-eos{eos_early_stop}".format(
                             **r["settings"]))
def test_matches_upstream_editing_sampler(lm, run, one_thread):
    s = run["settings"]
    lm.eos_id = s["eos_id"]
    try:
        out = generate_editing(lm, run["prompts"], max_new_tokens=s["max_new_tokens"], block_length=s["block_size"],
                               threshold=s["threshold"], editing_threshold=s["editing_threshold"],
                               max_post_steps=s["max_post_steps"], num_to_transfer=s["num_to_transfer"],
                               eos_early_stop=s["eos_early_stop"])
    finally:
        lm.eos_id = 502
    assert out.sequences.tolist() == run["output_ids"]
    assert out.n_forwards == run["n_forwards"]
    assert lm.block_size == 4  # a run's block length is restored


def test_fixture_edits_and_stops_early():
    assert sum(r["edits"] for r in RUNS) >= 50 and sum(r["edits"] > 0 for r in RUNS) >= 4
    eos = [r for r in RUNS if r["settings"]["eos_early_stop"]]
    assert eos and all(500 in r["output_ids"][0] for r in eos)  # stopped with blocks left masked


def test_rows_of_different_lengths_decode_alone(lm, one_thread):
    """Rows are decoded one at a time, as upstream decodes one sequence: a batch equals its rows run alone."""
    a, b = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    both = generate_editing(lm, [a, b], max_new_tokens=6, editing_threshold=0.0082, threshold=0.0088)
    alone = [generate_editing(lm, [p], max_new_tokens=6, editing_threshold=0.0082, threshold=0.0088) for p in (a, b)]
    assert both.sequences[0, both.prompt_length:both.prompt_length + alone[0].generated.shape[1]].tolist() == \
        alone[0].generated[0].tolist()
    assert both.sequences[1, both.prompt_length - 3:].tolist()[:3 + alone[1].generated.shape[1]] == \
        b + alone[1].generated[0].tolist()
    assert both.n_forwards == alone[0].n_forwards + alone[1].n_forwards
    with capture(lm, ["blocks.1.hook_resid_post"]) as cache:
        out = generate_editing(lm, [a], max_new_tokens=6)
    assert len(cache.acts["blocks.1.hook_resid_post"]) == out.n_forwards


@pytest.mark.parametrize("kwargs,message", [
    (dict(editing_threshold=1.5), "editing_threshold=1.5"),
    (dict(max_post_steps=-1), "max_post_steps=-1"),
    (dict(block_length=0), "block_length=0"),
    (dict(num_to_transfer=0), "num_to_transfer=0"),
])
def test_bad_input_is_one_line(lm, kwargs, message):
    with pytest.raises(DLMScopeError, match=message):
        generate_editing(lm, [[1, 2]], **kwargs)
    with pytest.raises(DLMScopeError, match="not a block-diffusion model"):
        generate_editing(load_model(FIXTURE.parent / "lladamoe_tiny"), [[1, 2]])
