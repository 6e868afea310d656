"""Parity with the upstream LLaDA / Dream remote code, through golden fixtures (see tests/fixtures/README.md).

The fixtures hold tiny random checkpoints in the upstream formats (weights stored in bf16, upcast
exactly to fp32) and the logits / generations the upstream code produced from them.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dlmscope import generate, load_model

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.fixture(scope="module", params=["llada_tiny", "dream_tiny"])
def case(request):
    folder = FIXTURES / request.param
    return (load_model(folder, dtype="float32"), load_file(str(folder / "inputs.safetensors")),
            load_file(str(folder / "reference.safetensors")))


@pytest.mark.parametrize("batch", ["unpadded", "left", "right"])
@torch.no_grad()
def test_logits_match_upstream(case, batch):
    lm, inputs, ref = case
    ids, mask = inputs[f"{batch}.input_ids"], inputs[f"{batch}.attention_mask"]
    real = mask.bool()
    # raw logits: Dream's reference is shifted too, so the comparison is position for position
    got = lm.forward(ids, mask)
    diff = (got - ref[f"{batch}.logits"])[real].abs().max()
    assert float(diff) <= 1e-5, f"{lm.family} {batch}: max |diff| {float(diff):.2e}"
    if batch != "unpadded":  # padding must really be in play for this case to mean anything
        assert not real.all()


def _runs():
    return json.loads((FIXTURES / "llada_tiny" / "generate.json").read_text())["runs"]


@pytest.fixture(scope="module")
def llada_fixture():
    return load_model(FIXTURES / "llada_tiny")


@pytest.mark.parametrize("run", _runs(), ids=lambda r: "steps{steps}-block{block_length}-cfg{cfg_scale}-{attention_mask}"
                         .format(**r["settings"]))
def test_generate_matches_upstream_llada(llada_fixture, run):
    s = run["settings"]
    mask = run["prompt_attention_mask"] or [[1] * len(p) for p in run["prompts"]]
    prompts = [[t for t, m in zip(p, row) if m] for p, row in zip(run["prompts"], mask)]  # we left-pad ourselves
    out = generate(llada_fixture, prompts, gen_length=s["gen_length"], steps=s["steps"],
                   block_length=s["block_length"], temperature=s["temperature"], remasking=s["remasking"],
                   cfg_scale=s["cfg_scale"])
    assert out.sequences.tolist() == run["output_ids"]
