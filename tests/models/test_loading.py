import json

import pytest
import torch

from dlmscope import DLMScopeError, load_model
from dlmscope.hooks import run_with_cache


@pytest.mark.parametrize("family,shift,causal", [("llada", False, False), ("dream", True, False), ("causal", False, True)])
def test_families_load(tiny_dirs, family, shift, causal):
    lm = load_model(tiny_dirs[family])
    assert lm.family == family and lm.shift == shift and lm.causal == causal and lm.is_diffusion == (not causal)
    assert lm.n_layers == 2 and lm.d_model == 64 and lm.n_params() > 0
    attn = [f"attn.hook_{k}" for k in ("q", "k", "v", "rot_q", "rot_k", "pattern", "z")] + ["hook_attn_out"]
    kinds = ["hook_resid_pre", *attn, "hook_resid_mid", "hook_mlp_in", "hook_mlp_out", "hook_resid_post"]
    assert lm.hook_names == [f"blocks.{i}.{k}" for i in range(2) for k in kinds]
    assert (lm.mask_id is not None) == (not causal)
    assert lm.forward(torch.randint(0, 100, (2, 7))).shape == (2, 7, lm.vocab_size)
    assert lm.layer_of("blocks.1.hook_resid_mid") == 1


def test_hook_sites_are_the_residual_stream(llada):
    ids = torch.randint(4, 100, (2, 6))
    acts = run_with_cache(llada, ids, llada.hook_names, stop_early=False)
    layer = llada.module.model.layers[0]
    with torch.no_grad():
        emb = llada.module.model.embed_tokens(ids)
    torch.testing.assert_close(acts["blocks.0.hook_resid_pre"], emb)
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], acts["blocks.1.hook_resid_pre"])
    # resid_post = resid_mid + MLP(norm(resid_mid))
    mid = acts["blocks.0.hook_resid_mid"]
    with torch.no_grad():
        post = mid + layer.mlp(layer.post_attention_layernorm(mid))
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], post)


def _shard(src, dst, n=3):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    keys = sorted(tensors)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = keys[i::n]
        save_file({k: tensors[k] for k in part}, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_sharded_llada_matches_single(tiny_dirs, tmp_path):
    _shard(tiny_dirs["llada"], tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 100, (1, 9))
    sharded = load_model(tmp_path)
    assert sharded.family == "llada" and sharded.mask_id == load_model(tiny_dirs["llada"]).mask_id
    torch.testing.assert_close(sharded.forward(ids), load_model(tiny_dirs["llada"]).forward(ids), rtol=0, atol=0)


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_half_precision_forward(tiny_dirs, family, dtype, torch_dtype):
    lm = load_model(tiny_dirs[family], dtype=dtype)
    assert lm.dtype == torch_dtype
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        low, full = lm.forward(ids).float(), load_model(tiny_dirs[family]).forward(ids)
    assert torch.isfinite(low).all()
    assert (low - full).abs().max() < 0.1 * full.abs().max()  # same model, coarser arithmetic


def test_causal_device_map_pass_through(tiny_dirs, monkeypatch):
    """device_map goes to transformers untouched (it spreads big checkpoints over devices)."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    device_map = {"model": "cpu", "lm_head": "cpu"}
    lm = load_model(tiny_dirs["causal"], device_map=device_map)
    assert seen["device_map"] == device_map and lm.device.type == "cpu"
    ids = torch.randint(0, 100, (1, 5))
    torch.testing.assert_close(lm.forward(ids), load_model(tiny_dirs["causal"]).forward(ids))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_native_device_map_places_modules_with_accelerate(tiny_dirs, family):
    """LLaDA and Dream spread over devices like the MoE loaders (CPU only here: accelerate's placement path runs,
    one device adds no hooks); same logits and the same captured residual stream as a plain load."""
    pytest.importorskip("accelerate")
    ref = load_model(tiny_dirs[family])
    ids = torch.randint(4, 100, (2, 7))
    per_module = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for device_map in ("auto", per_module):
        lm = load_model(tiny_dirs[family], device_map=device_map)
        assert getattr(lm.module, "hf_device_map", None) is not None  # accelerate placed it
        torch.testing.assert_close(lm.forward(ids), ref.forward(ids))
        name = "blocks.1.hook_resid_post"
        torch.testing.assert_close(run_with_cache(lm, ids, [name])[name], run_with_cache(ref, ids, [name])[name])


def test_masked_lm_device_map_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(DLMScopeError, match="device_map is not supported for masked_lm"):
        load_model(tmp_path, family="masked_lm", device_map="auto")


def test_transformer_lens_model_wraps():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    ht = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=16, d_head=8, d_vocab=50, act_fn="gelu"))
    lm = load_model(ht)
    assert lm.causal and lm.family == "transformer_lens" and lm.n_layers == 2 and lm.d_model == 32
    assert lm.mask_id is None and lm.vocab_size == 50
    names = [f"blocks.{i}.hook_resid_{k}" for i in range(2) for k in ("pre", "mid", "post")]
    assert set(names) | {"blocks.0.attn.hook_pattern", "blocks.1.hook_attn_out"} <= set(lm.hook_names)
    assert "blocks.0.attn.hook_rot_q" not in lm.hook_names  # learned positions: no rotary sites
    ids = torch.randint(0, 50, (1, 6))
    acts = run_with_cache(lm, ids, names, stop_early=False)
    logits, cache = ht.run_with_cache(ids)
    for name in names:
        torch.testing.assert_close(acts[name], cache[name])
    torch.testing.assert_close(lm.forward(ids), logits)


def _bert_folder(folder, with_mask: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"mask_token": "[MASK]"} if with_mask else {}
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", **special)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(str(folder))
    hf_tok.save_pretrained(str(folder))
    return folder


def test_masked_lm_loads(tmp_path):
    lm = load_model(_bert_folder(tmp_path))
    assert lm.family == "masked_lm" and lm.mask_id == 4 and not lm.causal and not lm.shift
    assert lm.n_layers == 2 and lm.d_model == 32
    assert lm.hook_names == [f"blocks.{i}.hook_resid_{k}" for i in range(2) for k in ("pre", "post")]
    ids = torch.tensor([[5, 4, 6]])
    assert lm.denoise_logits(ids).shape == (1, 3, 8)
    acts = run_with_cache(lm, ids, ["blocks.1.hook_resid_post"])
    with torch.no_grad():
        hidden = lm.module.bert(ids).last_hidden_state
    torch.testing.assert_close(acts["blocks.1.hook_resid_post"], hidden)


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(DLMScopeError, match=match) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_bad_inputs(tmp_path, tiny_dirs):
    _one_line_error(lambda: load_model(tmp_path / "missing"), "neither a checkpoint folder")
    _one_line_error(lambda: load_model(tmp_path), "no config.json")
    _one_line_error(lambda: load_model(tiny_dirs["llada"], family="gpt7"), "unknown family 'gpt7'; allowed: llada")
    _one_line_error(lambda: load_model(tiny_dirs["llada"], backend="magic"), "unknown backend 'magic'; allowed: native")
    _one_line_error(lambda: load_model(tiny_dirs["llada"], dtype="int3"), "unknown dtype 'int3'")
    from dlmscope.models.zoo import builtin_path

    _one_line_error(lambda: builtin_path("dlmscope-huge"), "unknown built-in model .*known: dlmscope-tiny-dlm")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_dirs["llada"] / "config.json").read_text())
    _one_line_error(lambda: load_model(bad), "no safetensors weights")
    (bad / "model.safetensors").write_bytes(b"garbage" * 10)
    _one_line_error(lambda: load_model(bad), "cannot read weights file")
    (bad / "config.json").write_text("{not json")
    _one_line_error(lambda: load_model(bad), "not valid JSON")
    lm = load_model(tiny_dirs["llada"])
    _one_line_error(lambda: lm.site("blocks.9.hook_resid_post"), r"out of range: .* layers 0\.\.1")
    _one_line_error(lambda: lm.site("blocks.0.hook_attn_z"),
                    r"unknown hook .*allowed: blocks\.\{0\.\.1\}\.\{hook_resid_pre\|attn\.hook_q")
    _one_line_error(lambda: lm.site("blocks.0.attn.hook_zz"), "unknown hook")
    causal = load_model(tiny_dirs["causal"])
    _one_line_error(causal.require_mask_id, "no mask token")
    _one_line_error(lambda: causal.denoise_logits(torch.tensor([[1, 2]])), "autoregressive")


def test_model_without_mask_token(tmp_path):
    from dlmscope import generate

    lm = load_model(_bert_folder(tmp_path, with_mask=False))
    assert lm.mask_id is None
    _one_line_error(lambda: generate(lm, [[5, 6]], gen_length=4, steps=4, block_length=4), "no mask token")


def test_dream_folder_without_config_fields(tiny_dirs, tmp_path):
    cfg = json.loads((tiny_dirs["dream"] / "config.json").read_text())
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((tiny_dirs["dream"] / "model.safetensors").read_bytes())
    _one_line_error(lambda: load_model(tmp_path), "Dream config.json lacks 'hidden_size'")


# A remote-code checkpoint of our own: LLaDA-like layout (blocks at model.transformer.blocks returning
# (hidden, cache), an `ff_norm` before the MLP), written the transformers-4 way the upstream files are
# (no post_init, a list `_tied_weights_keys`, `tie_weights()` without keywords).
TOY_MODELING = '''
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class ToyConfig(PretrainedConfig):
    model_type = "dlmscope_toy"

    def __init__(self, vocab_size=40, d_model=16, n_layers=2, mask_token_id=39, **kwargs):
        self.vocab_size, self.d_model, self.n_layers, self.mask_token_id = vocab_size, d_model, n_layers, mask_token_id
        super().__init__(**kwargs)


class ToyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mix = nn.Linear(d, d)
        self.ff_norm = nn.LayerNorm(d)
        self.ff = nn.Linear(d, d)

    def forward(self, x, attention_bias=None, layer_past=None, use_cache=False):
        keys = attention_bias[:, :, None].to(x.dtype)
        x = x + self.mix((x * keys).sum(1, keepdim=True) / keys.sum(1, keepdim=True))  # sees every real token
        return x + self.ff(self.ff_norm(x)), None


class ToyModel(PreTrainedModel):
    config_class = ToyConfig
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.model.transformer = nn.Module()
        self.model.transformer.blocks = nn.ModuleList(ToyBlock(config.d_model) for _ in range(config.n_layers))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def tie_weights(self):
        pass

    def forward(self, input_ids, attention_mask=None, use_cache=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.dim() == 4:
            attention_mask = attention_mask[:, 0].any(1)
        x = self.model.embed_tokens(input_ids)
        for block in self.model.transformer.blocks:
            x, _ = block(x, attention_bias=attention_mask.bool())
        return CausalLMOutput(logits=self.lm_head(x))
'''


@pytest.fixture
def toy_remote(tmp_path):
    import importlib.util

    from safetensors.torch import save_file

    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "modeling_toy.py").write_text(TOY_MODELING)
    spec = importlib.util.spec_from_file_location("modeling_toy_reference", folder / "modeling_toy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    reference = mod.ToyModel(mod.ToyConfig()).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "dlmscope_toy", "architectures": ["ToyModel"], "vocab_size": 40, "d_model": 16, "n_layers": 2,
        "mask_token_id": 39, "auto_map": {"AutoConfig": "modeling_toy.ToyConfig", "AutoModel": "modeling_toy.ToyModel"},
    }))
    return folder, reference


def test_remote_backend_loads_own_code(toy_remote):
    from dlmscope import generate

    folder, reference = toy_remote
    lm = load_model(folder, family="llada", backend="remote")
    assert type(lm.module).__name__ == "ToyModel" and lm.family == "llada" and not lm.shift and not lm.causal
    assert lm.n_layers == 2 and lm.d_model == 16 and lm.vocab_size == 40 and lm.mask_id == 39
    assert lm.hook_names == [f"blocks.{i}.hook_resid_{k}" for i in range(2) for k in ("pre", "mid", "post")]
    ids = torch.randint(0, 39, (2, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(lm.forward(ids, mask), reference(ids, attention_mask=mask).logits)
        block_out = reference.model.transformer.blocks[1](reference.model.transformer.blocks[0](
            reference.model.embed_tokens(ids), attention_bias=torch.ones_like(ids).bool())[0],
            attention_bias=torch.ones_like(ids).bool())[0]
    torch.testing.assert_close(run_with_cache(lm, ids, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"],
                               block_out)
    out = generate(lm, [[1, 2, 3]], gen_length=4, steps=4, block_length=4)
    assert not (out.generated == 39).any()
    _one_line_error(lambda: lm.site("blocks.0.attn.hook_pattern"), "exposes no attention internals")
    dream_like = load_model(folder, family="dream", backend="remote")  # 4-D mask path and shifted logits
    assert dream_like.shift
    with torch.no_grad():
        torch.testing.assert_close(dream_like.forward(ids, mask), reference(ids, attention_mask=mask).logits)


def test_remote_backend_bad_input(tmp_path, toy_remote):
    folder, _ = toy_remote
    _one_line_error(lambda: load_model(folder, family="transformer_lens", backend="remote"),
                    "remote backend cannot load family")
    (folder / "modeling_toy.py").unlink()
    _one_line_error(lambda: load_model(folder, family="llada", backend="remote"), "cannot read the remote-code config")


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_native_loaders_never_run_the_folders_code(tiny_dirs, tmp_path, caplog):
    """A tokenizer that needs its own code is refused natively (nothing runs); backend=remote runs it and logs so."""
    from typer.testing import CliRunner

    from dlmscope.cli import app

    folder = _copy_model(tiny_dirs["llada"], tmp_path / "m")
    marker = tmp_path / "ran"
    (folder / "evil_tok.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(app, ["info", str(folder)])
    assert not marker.exists()
    assert isinstance(result.exception, DLMScopeError) and "backend='remote'" in str(result.exception)
    assert "\n" not in str(result.exception)
    from dlmscope.models.checkpoint import load_tokenizer

    with caplog.at_level("WARNING", logger="dlmscope"):
        tok = load_tokenizer(folder, remote=True)
    assert marker.exists() and type(tok).__name__ == "EvilTokenizer"
    assert "may run Python code shipped in" in caplog.text


def test_truncated_tokenizer_and_bad_head_counts_are_one_line(tiny_dirs, tmp_path):
    folder = _copy_model(tiny_dirs["llada"], tmp_path / "t")
    tok = folder / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[: tok.stat().st_size // 2])
    _one_line_error(lambda: load_model(folder), "cannot load the tokenizer in")
    for family, key, value, message in (("llada", "n_heads", 3, "3 attention heads do not divide the width 64"),
                                        ("dream", "num_attention_heads", 3, "3 attention heads do not divide the width 64"),
                                        ("dream", "num_key_value_heads", 3, "3 key/value heads do not divide the 4"),
                                        ("dream", "num_attention_heads", "4", "attention heads '4' must be a positive")):
        folder = tmp_path / f"{family}-{key}-{value}"
        if not folder.exists():
            _copy_model(tiny_dirs[family], folder)
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, key: value}))
        _one_line_error(lambda: load_model(folder), message)


@pytest.mark.parametrize("kind", ["llada", "dream", "causal", "lladamoe", "llada2"])
def test_a_deep_copy_runs_its_own_weights(kind, tiny_dirs, tmp_path):
    """The RL reference model is a deepcopy: its forward (and KV-cache call) must run the copied module, not
    the original one its closures were built over."""
    import copy

    from dlmscope.models.tiny import write_tiny_llada2, write_tiny_lladamoe

    writers = {"lladamoe": write_tiny_lladamoe, "llada2": write_tiny_llada2}
    folder = writers[kind](tmp_path / kind) if kind in writers else tiny_dirs[kind]
    lm = load_model(str(folder))
    ids = torch.randint(0, 100, (2, 8))
    before = lm.forward(ids)
    twin = copy.deepcopy(lm)
    assert torch.equal(twin.forward(ids), before)
    with torch.no_grad():
        for p in twin.module.parameters():
            p.mul_(0.5)
    assert torch.equal(lm.forward(ids), before) and not torch.allclose(twin.forward(ids), before)
    if lm.kv_call is not None:
        mask = torch.ones_like(ids)
        assert not torch.allclose(twin.kv_call(ids, mask, None, None)[0], lm.kv_call(ids, mask, None, None)[0])


def _copy(folder, to):
    import shutil

    return shutil.copytree(folder, to)


def _info_fails(folder, capsys) -> str:
    from dlmscope.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(folder), "--gen-length", "4", "--steps", "4"])
    out = capsys.readouterr()
    err = out.err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and not out.out, (out.out, err)
    return err


def test_pickled_only_causal_folder_is_refused_unread(tiny_dirs, tmp_path, capsys):
    """A causal folder with only pytorch_model.bin: one line, and the pickle is never opened (it would run code)."""
    import pickle

    folder = _copy(tiny_dirs["causal"], tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    assert "holds only pickled weights (pytorch_model.bin)" in _info_fails(folder, capsys)
    assert not marker.exists()


def test_unknown_model_type_is_one_line(tiny_dirs, tmp_path, capsys):
    folder = _copy(tiny_dirs["causal"], tmp_path / "odd")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch"}))
    assert "model_type='no_such_arch', which neither dlmscope" in _info_fails(folder, capsys)


def test_mask_id_past_the_vocabulary_is_refused_at_load(tiny_dirs, tmp_path, capsys):
    folder = _copy(tiny_dirs["llada"], tmp_path / "mask")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mask_token_id": config["vocab_size"] + 7}))
    assert f"mask_token_id={config['vocab_size'] + 7} lies outside its vocabulary" in _info_fails(folder, capsys)


def test_nan_weight_is_refused_at_load(tiny_dirs, tmp_path, capsys):
    """A checkpoint holding one NaN used to generate an empty continuation with exit code 0."""
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_dirs["llada"], tmp_path / "nan")
    weights = load_file(str(folder / "model.safetensors"))
    key = next(k for k in weights if k.endswith("ff_out.weight") or k.endswith("wte.weight"))
    weights[key][3, 2] = float("nan")
    save_file(weights, str(folder / "model.safetensors"))
    err = _info_fails(folder, capsys)
    assert "is unusable: tensor" in err and "(1 of" in err
