"""Native LLaDA-MoE and LLaDA 2.x loaders: golden parity with upstream, tiny builders, bad configs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlmscope.errors import DLMScopeError
from dlmscope.hooks import run_with_cache
from dlmscope.models import detect_family, load_model
from dlmscope.models.tiny import write_tiny_llada2, write_tiny_lladamoe

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.fixture(scope="module", params=["lladamoe_tiny", "llada2_tiny"])
def golden(request):
    folder = FIXTURES / request.param
    return (load_model(folder), load_file(str(folder / "inputs.safetensors")),
            load_file(str(folder / "reference.safetensors")))


@pytest.mark.parametrize("batch", ["unpadded", "left", "right"])
@torch.no_grad()
def test_logits_match_upstream(golden, batch):
    lm, inputs, ref = golden
    ids, mask = inputs[f"{batch}.input_ids"], inputs[f"{batch}.attention_mask"]
    real = mask.bool()
    diff = (lm.forward(ids, mask) - ref[f"{batch}.logits"])[real].abs().max()
    assert float(diff) <= 1e-5, f"{lm.family} {batch}: max |diff| {float(diff):.2e}"
    assert real.all() == (batch == "unpadded")


def test_router_sites_match_upstream(golden):
    lm, inputs, ref = golden
    keys = sorted(k for k in ref if k.startswith("layer"))
    names = [f"blocks.{k[5]}.hook_{k.split('.')[1]}" for k in keys]
    got = run_with_cache(lm, inputs["unpadded.input_ids"], names)
    for key, name in zip(keys, names):
        assert torch.allclose(got[name].float(), ref[key].float(), atol=1e-5), name
    assert "blocks.0.hook_router_logits" not in lm.hook_names  # layer 0 is dense in both fixtures


def test_detect_family_by_architecture():
    cfg = json.loads((FIXTURES / "lladamoe_tiny" / "config.json").read_text())
    assert cfg["model_type"] == "llada" and detect_family(cfg) == "lladamoe"  # as the released checkpoint ships
    assert detect_family({"model_type": "llada2_moe"}) == "llada2"
    assert detect_family({"model_type": "x", "architectures": ["LLaDA2MoeModelLM"]}) == "llada2"
    assert detect_family({"model_type": "llada", "architectures": ["LLaDAModelLM"]}) == "llada"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {"lladamoe": write_tiny_lladamoe(root / "lladamoe"), "llada2": write_tiny_llada2(root / "llada2")}


@torch.no_grad()
def test_tiny_builders_and_sharded_bf16(tiny, tmp_path):
    for family, folder in tiny.items():
        lm = load_model(folder)
        assert (lm.family, lm.n_experts, lm.n_active_experts) == (family, 8, 2)
        assert lm.block_size == (4 if family == "llada2" else None)
        ids = torch.randint(0, 500, (2, 9))
        ref = lm(ids)
        # the same weights split over two shards with an index
        shard = tmp_path / family
        shard.mkdir()
        shutil.copy(folder / "config.json", shard)
        state = load_file(str(folder / "model.safetensors"))
        keys = sorted(state)
        half = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
        for file, ks in half.items():
            save_file({k: state[k] for k in ks}, str(shard / file))
        (shard / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: f for f, ks in half.items() for k in ks}}))
        assert (load_model(shard)(ids) - ref).abs().max() < 1e-5
        low = load_model(shard, dtype="bfloat16")
        assert low.dtype == torch.bfloat16 and low(ids).dtype == torch.float32


@torch.no_grad()
def test_llada2_attention_is_block_causal(tiny):
    lm = load_model(tiny["llada2"])  # block size 4
    ids = torch.randint(0, 500, (1, 12))
    base = lm(ids)
    later = ids.clone()
    later[0, 9] = (later[0, 9] + 1) % 500  # a token in block 2
    out = lm(later)
    assert (out[:, :8] - base[:, :8]).abs().max() < 1e-5  # blocks 0 and 1 cannot see it
    assert (out[:, 8:] - base[:, 8:]).abs().amax(-1).min() > 1e-4  # every position of its own block can


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("family,changes,field", [
    ("lladamoe", {"moe_router_score_function": "sigmoid"}, "moe_router_score_function"),
    ("lladamoe", {"moe_layer_freq": [1]}, "moe_layer_freq"),
    ("lladamoe", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("llada2", {"block_size": 3}, "block_size"),
    ("llada2", {"n_group": 3}, "n_group"),
    ("llada2", {"topk_group": 5}, "topk_group"),
    ("llada2", {"rope_scaling": {"type": "yarn"}}, "rope_scaling"),
])
def test_unsupported_config_is_one_line(tiny, tmp_path, family, changes, field):
    folder = _with_config(tiny[family], tmp_path / "bad", **changes)
    with pytest.raises(DLMScopeError, match=field) as e:
        load_model(folder)
    assert "\n" not in str(e.value)
