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


@pytest.mark.parametrize("run", _runs(), ids=lambda r: "{cache}-th{threshold}-steps{steps}-gen{gen_length}".format(
    **r["settings"]) + f"-p{len(r['prompts'][0])}")
def test_matches_upstream_fast_dllm(llada_fixture, run, one_thread):
    s = run["settings"]
    out = generate(llada_fixture, run["prompts"], gen_length=s["gen_length"], steps=s["steps"],
                   block_length=s["block_length"], temperature=s["temperature"], remasking=s["remasking"],
                   threshold=s["threshold"], cache=s["cache"])
    assert out.sequences.tolist() == run["output_ids"]
    assert out.n_forwards == run["nfe"]
