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


@pytest.fixture(scope="module", params=["llada_tiny", "llada_qkv_tiny", "dream_tiny", "lladamoe_tiny", "llada2_tiny"])
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


def _runs(folder: str) -> list[dict]:
    return json.loads((FIXTURES / folder / "generate.json").read_text())["runs"]


def _unpadded_prompts(run: dict) -> list[list[int]]:
    """The fixture's prompts without their pads: we left-pad ourselves."""
    mask = run["prompt_attention_mask"] or [[1] * len(p) for p in run["prompts"]]
    return [[t for t, m in zip(p, row) if m] for p, row in zip(run["prompts"], mask)]


def test_qkv_bias_checkpoint_has_qkv_but_no_output_bias():
    """The include_qkv_bias case is what it claims: q/k/v biases, no attn_out bias (loaded as zeros)."""
    cfg = json.loads((FIXTURES / "llada_qkv_tiny" / "config.json").read_text())
    assert cfg["include_qkv_bias"] and not cfg["include_bias"]
    attn = load_model(FIXTURES / "llada_qkv_tiny").layers[0].self_attn
    assert attn.q_proj.bias.abs().sum() > 0 and attn.v_proj.bias.abs().sum() > 0 and not attn.o_proj.bias.any()


@pytest.fixture(scope="module")
def llada_fixture():
    return load_model(FIXTURES / "llada_tiny")


@pytest.mark.parametrize("run", _runs("llada_tiny"), ids=lambda r: "{remasking}-T{temperature}-steps{steps}-gen{gen_length}"
                         "-block{block_length}-cfg{cfg_scale}-{attention_mask}".format(**r["settings"]))
def test_generate_matches_upstream_llada(llada_fixture, run):
    """Token for token; seeded runs (random remasking, temperature > 0) seed our generator as upstream's global one."""
    s = run["settings"]
    out = generate(llada_fixture, _unpadded_prompts(run), gen_length=s["gen_length"], steps=s["steps"],
                   block_length=s["block_length"], temperature=s["temperature"], remasking=s["remasking"],
                   cfg_scale=s["cfg_scale"], seed=s["seed"])
    assert out.sequences.tolist() == run["output_ids"]


@pytest.fixture(scope="module")
def dream_fixture():
    return load_model(FIXTURES / "dream_tiny", dtype="float32")


@pytest.mark.parametrize("run", _runs("dream_tiny"), ids=lambda r: "{alg}-steps{steps}-gen{max_new_tokens}-eps{eps}-p{top_p}"
                         "-k{top_k}-rows{n}".format(n=len(r["prompts"]), **{"top_p": None, "top_k": None, **r["settings"]}))
def test_generate_matches_upstream_dream(dream_fixture, run):
    """Dream's `diffusion_generate`, token for token, with our defaults for a Dream checkpoint (schedule `dream`,
    one block); `origin` runs seed our generator as upstream's global one."""
    s = run["settings"]
    out = generate(dream_fixture, _unpadded_prompts(run), gen_length=s["max_new_tokens"], steps=s["steps"],
                   remasking=s["alg"], temperature=s["temperature"], eps=s["eps"], top_p=s.get("top_p"),
                   top_k=s.get("top_k"), seed=s["seed"])
    assert out.sequences.tolist() == run["output_ids"]


def test_dream_fixture_covers_padding_and_uneven_steps():
    runs = _runs("dream_tiny")
    assert {r["settings"]["alg"] for r in runs} == {"origin", "maskgit_plus", "topk_margin", "entropy"}
    for alg in ("origin", "maskgit_plus", "topk_margin", "entropy"):
        mine = [r for r in runs if r["settings"]["alg"] == alg]
        assert any(len(r["prompts"]) == 3 and r["prompt_attention_mask"] and r["settings"]["max_new_tokens"]
                   % r["settings"]["steps"] for r in mine)


def test_dream_generation_config_matches_our_defaults(dream_fixture):
    """The checkpoint's generation_config.json (upstream defaults) agrees with our ids and Dream defaults."""
    import inspect

    cfg = json.loads((FIXTURES / "dream_tiny" / "generation_config.json").read_text())
    assert cfg["mask_token_id"] == dream_fixture.mask_id == 500
    assert cfg["eps"] == inspect.signature(generate).parameters["eps"].default
    assert cfg["temperature"] == inspect.signature(generate).parameters["temperature"].default
    assert cfg["pad_token_id"] == dream_fixture.module.config.pad_token_id
