import json

import pytest
import torch

from dlmscope.analysis.experts import expert_dynamics, unmasking_overlap, usage_by_status
from dlmscope.cli import main
from dlmscope.errors import DLMScopeError
from dlmscope.hooks import capture, hooked
from dlmscope.models import load_model
from dlmscope.models.tiny import write_tiny_llada2, write_tiny_lladamoe


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("moe")
    kw = dict(vocab_size=len(tokenizer), tokenizer=tokenizer, mask_id=tokenizer.mask_token_id)
    return {"lladamoe": write_tiny_lladamoe(root / "lladamoe", **kw), "llada2": write_tiny_llada2(root / "llada2", **kw)}


def test_usage_and_overlap_by_hand():
    # 2 steps, 1 row, 3 positions (0 prompt, 1-2 generated), k=1, 4 experts
    idx = torch.tensor([[[[0], [1], [2]]], [[[0], [1], [3]]]])
    masks = torch.tensor([[[False, True, True]], [[False, False, True]]])
    usage = usage_by_status(idx, masks, torch.ones(1, 3, dtype=torch.bool), 4)
    assert usage[0, 0].tolist() == [0, 0.5, 0.5, 0] and usage[0, 1].tolist() == [1, 0, 0, 0]
    assert usage[1, 0].tolist() == [0, 0, 0, 1] and usage[1, 1].tolist() == [0.5, 0.5, 0, 0]
    got = unmasking_overlap(idx, masks, gen_from=1, n_experts=4)
    # position 1 decoded at step 0: same expert after -> overlap 1; position 2 never visible
    assert got["unmask_overlap"] == 1.0
    assert got["overlap_with_final_by_offset"] == {-2: 0.0, -1: 1.0, 0: 1.0}  # pos 2 switches 2 -> 3 at its last step


def test_router_sites_capture_and_edit_during_sampling(moe_dirs):
    from dlmscope import generate

    lm = load_model(moe_dirs["llada2"])
    names = ["blocks.1.hook_router_logits", "blocks.1.hook_expert_weights", "blocks.1.hook_expert_indices"]
    with capture(lm, names, positions="masked", steps=[0, 3]) as cache:
        generate(lm, [[5, 6, 7, 8]], gen_length=8, steps=8)  # the model's own blocks of 4
    assert cache.steps[names[0]] == [0, 3]
    logits, weights, chosen = (cache.acts[n][0] for n in names)
    assert logits.shape == (8, 8) and weights.shape == chosen.shape == (8, 2)  # 8 masked positions at step 0
    assert torch.allclose(weights.sum(-1), torch.full((8,), 2.5))  # routed_scaling_factor
    # an edit: forbid expert 0 everywhere by sinking its router logit
    def ban(act, ctx):
        act = act.clone()
        act[..., 0] = -1e4
        return act

    with hooked(lm, {"blocks.1.hook_router_logits": ban}), capture(lm, [names[2]]) as cache:
        lm(torch.randint(0, 200, (2, 8)))
    assert not (cache[names[2]] == 0).any()


def test_expert_dynamics_and_cli(moe_dirs, tmp_path, capsys):
    lm = load_model(moe_dirs["lladamoe"])
    result = expert_dynamics(lm, ["def f", "x ="], gen_length=8, steps=4, block_length=8)
    assert sorted(result["layers"]) == [0, 1]
    layer = result["layers"][0]
    visible = torch.tensor(layer["usage"]["visible"])
    assert visible.shape == (4, 8) and torch.allclose(visible.sum(-1), torch.ones(4))
    assert 0 <= layer["masked_vs_visible_tv"] <= 1 and 0 <= layer["unmask_overlap"] <= 1
    main(["experts", "--model", str(moe_dirs["llada2"]), "-p", "def f", "--gen-length", "8", "--steps", "4",
          "--out", str(tmp_path / "rep")])
    saved = json.loads((tmp_path / "rep" / "experts.json").read_text())
    assert sorted(saved["layers"]) == ["1", "2"] and "plotly" in (tmp_path / "rep" / "experts.html").read_text()
    assert "layer 1: TV(masked, visible)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["experts", "--model", str(moe_dirs["llada2"]), "--layer", "0"])
    assert "layer 0 has no router; MoE layers: 1, 2" in capsys.readouterr().err
    with pytest.raises(DLMScopeError, match="has no experts"):
        expert_dynamics(load_model("dlmscope-tiny-dlm"), ["a"], gen_length=4, steps=4)
