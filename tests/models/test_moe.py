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
    """The MoE fixtures (their logits parity runs in test_parity.py with every other family's)."""
    folder = FIXTURES / request.param
    return (load_model(folder), load_file(str(folder / "inputs.safetensors")),
            load_file(str(folder / "reference.safetensors")))


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


# Remote code of our own written like the upstream LLaDA 2.x files: transformers-4 style, a rotary
# module holding `rope_init_fn` (the "default" init transformers 5 dropped) and a non-persistent
# `inv_freq`, no `reset_parameters`; the forward insists on the 4-D bool mask the sampler builds.
TOY_MOE = '''
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class ToyMoeConfig(PretrainedConfig):
    model_type = "dlmscope_toy_moe"

    def __init__(self, vocab_size=40, hidden_size=16, num_attention_heads=2, num_hidden_layers=2, num_experts=4,
                 num_experts_per_tok=2, block_size=3, rope_theta=10000.0, mask_token_id=39, **kwargs):
        self.vocab_size, self.hidden_size, self.num_attention_heads = vocab_size, hidden_size, num_attention_heads
        self.num_hidden_layers, self.num_experts, self.num_experts_per_tok = num_hidden_layers, num_experts, num_experts_per_tok
        self.block_size, self.rope_theta, self.mask_token_id = block_size, rope_theta, mask_token_id
        super().__init__(**kwargs)


class Rotary(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rope_init_fn = ROPE_INIT_FUNCTIONS["default"]
        inv_freq, self.attention_scaling = self.rope_init_fn(config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)


class Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.post_attention_layernorm = nn.LayerNorm(d)

    def forward(self, x, mask, phase):
        w = mask[:, 0].to(x.dtype)
        x = x + (w @ (self.mix(self.input_layernorm(x)) * phase)) / w.sum(-1, keepdim=True)
        return (x + self.post_attention_layernorm(x),)


class ToyMoeModel(PreTrainedModel):
    config_class = ToyMoeConfig
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Layer(config.hidden_size) for _ in range(config.num_hidden_layers))
        self.model.rotary_emb = Rotary(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def tie_weights(self):
        pass

    def forward(self, input_ids, attention_mask=None, use_cache=None, **kwargs):
        assert attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool
        freqs = torch.arange(input_ids.shape[1])[:, None].float() * self.model.rotary_emb.inv_freq[None]
        phase = freqs.cos().repeat(1, self.config.hidden_size // freqs.shape[1])
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, attention_mask, phase)[0]
        return CausalLMOutput(logits=self.lm_head(x))
'''


def test_remote_backend_moe_shims(tmp_path):
    import importlib.util

    from dlmscope.models.llada2 import block_mask
    from dlmscope.models.remote import _compat

    folder = tmp_path / "toy_moe"
    folder.mkdir()
    (folder / "modeling_toy_moe.py").write_text(TOY_MOE)
    spec = importlib.util.spec_from_file_location("modeling_toy_moe_reference", folder / "modeling_toy_moe.py")
    mod = importlib.util.module_from_spec(spec)
    with _compat():
        spec.loader.exec_module(mod)
        torch.manual_seed(0)
        reference = mod.ToyMoeModel(mod.ToyMoeConfig()).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llada2_moe", "architectures": ["LLaDA2MoeModelLM"], "block_size": 3, "mask_token_id": 39,
        "auto_map": {"AutoConfig": "modeling_toy_moe.ToyMoeConfig", "AutoModelForCausalLM": "modeling_toy_moe.ToyMoeModel"},
    }))
    lm = load_model(folder, backend="remote")  # family detected from the architecture
    assert (lm.family, lm.n_experts, lm.n_active_experts, lm.block_size, lm.mask_id) == ("llada2", 4, 2, 3, 39)
    ids = torch.randint(0, 39, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    with torch.no_grad():
        want = reference(ids, attention_mask=block_mask(mask, 7, 3, "cpu")).logits
        torch.testing.assert_close(lm.forward(ids, mask), want)  # rotary recomputed, block mask passed
        torch.testing.assert_close(lm.forward(ids), reference(ids, attention_mask=block_mask(None, 7, 3, "cpu")).logits)


@torch.no_grad()
def test_block_model_reads_each_block_given_clean_earlier_blocks():
    from dlmscope.diffusion.loss import diffusion_lm_loss, elbo_loss, log_likelihood, token_ce
    from dlmscope.diffusion.noise import corrupt

    lm = load_model(FIXTURES / "llada2_tiny")  # blocks of 4
    x0 = torch.randint(0, 500, (2, 12))
    xt = x0.clone()
    xt[:, [1, 5, 6, 10, 11]] = lm.mask_id
    got = lm.denoise_logits(xt, clean=x0)
    name = "blocks.2.hook_resid_post"
    acts = run_with_cache(lm, xt, [name], clean=x0)[name]
    assert acts.shape[:2] == (2, 12)  # hooks see the noisy pass only, not the clean context pass
    for b in range(3):
        ids = torch.cat([x0[:, :4 * b], xt[:, 4 * b:4 * b + 4]], 1)  # clean earlier blocks, noisy block b
        assert (got[:, 4 * b:4 * b + 4] - lm(ids)[:, 4 * b:]).abs().max() < 1e-5
        assert (acts[:, 4 * b:4 * b + 4] - run_with_cache(lm, ids, [name])[name][:, 4 * b:]).abs().max() < 1e-5
    assert (lm.denoise_logits(xt)[:, 4:] - got[:, 4:]).abs().max() > 1e-3  # without x0 the masks of earlier blocks show
    c = corrupt(x0, lm.mask_id, 0.4, generator=torch.Generator().manual_seed(0))
    assert torch.isclose(diffusion_lm_loss(lm, x0, c), elbo_loss(lm.denoise_logits(c.xt, clean=x0), x0, c))
    # one answer token per block: the block-factorised estimator is exact, sum over blocks of CE given clean context
    seq = torch.randint(0, 500, (12,))
    prompt, answer = seq[:3], seq[3:]  # answer blocks: positions 3 | 4-7 | 8-11
    short = torch.cat([prompt, answer[:1]])
    want = -float(token_ce(lm.denoise_logits(torch.cat([prompt, torch.tensor([lm.mask_id])])[None]), short[None])[0, 3])
    assert abs(log_likelihood(lm, prompt, answer[:1], n_draws=3) - want) < 1e-4
    assert log_likelihood(lm, prompt, answer, n_draws=8, generator=torch.Generator().manual_seed(0)) < 0


@torch.no_grad()
def test_device_map_places_modules_with_accelerate():
    """CPU only here: accelerate's placement path runs (one device, so it adds no hooks); same logits and routing."""
    folder = FIXTURES / "llada2_tiny"
    ref = load_model(folder)
    ids = torch.randint(0, 500, (2, 10))
    per_layer = {"model.word_embeddings": "cpu", **{f"model.layers.{i}": "cpu" for i in range(3)},
                 "model.norm": "cpu", "lm_head": "cpu"}
    for device_map in ("auto", per_layer):
        lm = load_model(folder, device_map=device_map)
        assert (lm(ids) - ref(ids)).abs().max() < 1e-6
        name = "blocks.1.hook_expert_indices"
        assert torch.equal(run_with_cache(lm, ids, [name])[name], run_with_cache(ref, ids, [name])[name])
