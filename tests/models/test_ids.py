"""Released folders out of the box: family ids, overrides, and upstream's own defaults token for token.

`tests/fixtures/released/golden.json` holds upstream's generate (each family's defaults) on tiny folders that
our builders write in the released layout (no mask id, no block size, no tokenizer); the test rebuilds them
and checks the weights' sha256 first (see tests/fixtures/README.md).
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

import dlmscope
from dlmscope.diffusion.blocks import generate_blocks
from dlmscope.diffusion.editing import generate_editing
from dlmscope.errors import DLMScopeError
from dlmscope.models import load_model
from dlmscope.models.tiny import write_tiny_llada2, write_tiny_lladamoe

GOLDEN = json.loads((Path(__file__).parents[1] / "fixtures" / "released" / "golden.json").read_text())


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    folders = {"llada2": write_tiny_llada2(root / "llada2", **GOLDEN["llada2"]["build"]),
               "lladamoe": write_tiny_lladamoe(root / "lladamoe", **GOLDEN["lladamoe"]["build"])}
    for family, folder in folders.items():
        assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == GOLDEN[family]["sha256"]
    return folders


def test_released_folders_declare_nothing_and_load_with_the_family_ids(released):
    for family, folder in released.items():
        config = json.loads((folder / "config.json").read_text())
        assert "mask_token_id" not in config and "block_size" not in config
        assert not (folder / "tokenizer.json").exists()
        lm = load_model(folder)
        assert (lm.mask_id, lm.eos_id, lm.pad_id, lm.context_length) == (156895, 156892, 156892, 4096)
        assert lm.block_size == (32 if family == "llada2" else None)


def test_llada2_defaults_match_upstream_generate(released, one_thread):
    """The 2.0 checkpoint's own generate with its defaults (only gen_length given): our block sampler, reached
    through generate_blocks and dlmscope.generate alike (steps there count over all blocks: 20 in one block)."""
    lm = load_model(released["llada2"])
    gold = GOLDEN["llada2"]
    prompt = gold["prompt"]
    assert generate_blocks(lm, prompt, max_new_tokens=20).generated[:, :20].tolist() == gold["output_ids"]
    assert dlmscope.generate(lm, prompt, gen_length=20, steps=20).generated[:, :20].tolist() == gold["output_ids"]


def test_llada21_defaults_match_upstream_generate(released, one_thread):
    lm = load_model(released["llada2"])
    gold = GOLDEN["llada21"]
    assert generate_editing(lm, gold["prompt"], max_new_tokens=20).generated[:, :20].tolist() == gold["output_ids"]


def test_eos_early_stop_matches_upstream(released, one_thread):
    """Upstream returns the generation up to its first EOS; we stop after that block (later blocks stay masked)."""
    gold = GOLDEN["llada2_eos"]
    lm = load_model(released["llada2"], eos_id=gold["settings"]["eos_id"])
    out = generate_blocks(lm, gold["prompt"], max_new_tokens=60, eos_early_stop=True)
    n = len(gold["output_ids"][0])
    assert out.generated[:, :n].tolist() == gold["output_ids"]
    first_block = 32 - len(gold["prompt"][0])  # the EOS lies in it: one forward per position, then stop
    assert out.n_forwards == first_block and (out.generated[:, first_block:] == lm.mask_id).all()


def test_lladamoe_matches_upstream_with_the_released_mask_id(released, one_thread):
    lm = load_model(released["lladamoe"])
    gold = GOLDEN["lladamoe"]
    s = gold["settings"]
    out = dlmscope.generate(lm, gold["prompt"], gen_length=s["gen_length"], steps=s["steps"],
                            block_length=s["block_length"])
    assert out.sequences.tolist() == gold["output_ids"]


def test_overrides_and_folder_ids(released, tmp_path):
    lm = load_model(released["llada2"], mask_id=7, pad_id=8, eos_id=9, block_size=8)
    assert (lm.mask_id, lm.pad_id, lm.eos_id, lm.block_size) == (7, 8, 9, 8)
    fixture = load_model(Path(__file__).parents[1] / "fixtures" / "lladamoe_tiny")  # config declares 500/501/502
    assert (fixture.mask_id, fixture.pad_id, fixture.eos_id) == (500, 501, 502)
    small = write_tiny_lladamoe(tmp_path / "small", vocab_size=512)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "mask_token_id"}))
    with pytest.raises(DLMScopeError, match="has no mask token"):  # the released id lies past this vocabulary
        dlmscope.generate(load_model(small), [[1, 2]], gen_length=4, steps=4)


def test_moe_without_tokenizer_pads_with_the_pad_id_and_checks_the_context(one_thread):
    """Left-padded prompts get the pad id (not the mask id) and the MoE module's context length is enforced."""
    lm = load_model(Path(__file__).parents[1] / "fixtures" / "lladamoe_tiny")
    seen = []
    out = dlmscope.generate(lm, [[1, 2, 3], [4]], gen_length=4, steps=4, block_length=4,
                            callback=lambda rec: seen.append(rec.x[1, :2].tolist()))
    assert seen[0] == [501, 501] and out.attention_mask[1, :2].tolist() == [0, 0]
    with pytest.raises(DLMScopeError, match="exceeds lladamoe_tiny's context of 4096"):
        dlmscope.generate(lm, [[1] * 4090], gen_length=8, steps=8, block_length=8)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mask_id=-1), "mask_id=-1 must be an integer >= 0"),
    (dict(eos_id=1.5), "eos_id=1.5 must be an integer"),
    (dict(block_size=0), "block_size=0 must be an integer >= 1"),
    (dict(pad_id=10**6), "pad_id=1000000 must be an integer >= 0 and <= 511"),
])
def test_bad_ids_are_one_line(kwargs, message):
    with pytest.raises(DLMScopeError, match=message):
        load_model(Path(__file__).parents[1] / "fixtures" / "llada2_tiny", **kwargs)


def test_block_size_only_for_block_models():
    with pytest.raises(DLMScopeError, match="only block-diffusion models"):
        load_model(Path(__file__).parents[1] / "fixtures" / "lladamoe_tiny", block_size=4)
    dense = load_model(Path(__file__).parents[1] / "fixtures" / "lladamoe_tiny")
    with pytest.raises(DLMScopeError, match="attends bidirectionally"):
        dense.block_size = 4
    assert torch.equal(dense.forward_bidirectional(torch.tensor([[1, 2, 3]])), dense.forward(torch.tensor([[1, 2, 3]])))
