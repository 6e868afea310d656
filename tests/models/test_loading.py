import json

import pytest
import torch

from dlmscope import DLMScopeError, load_model


@pytest.mark.parametrize("family,shift,causal", [("llada", False, False), ("dream", True, False), ("causal", False, True)])
def test_families_load(tiny_dirs, family, shift, causal):
    lm = load_model(tiny_dirs[family])
    assert lm.family == family and lm.shift == shift and lm.causal == causal
    assert lm.n_layers == 2 and lm.d_model == 64
    assert "blocks.1.hook_resid_post" in lm.hook_names and "blocks.0.hook_resid_mid" in lm.hook_names
    assert lm.forward(torch.randint(0, 100, (2, 7))).shape == (2, 7, lm.vocab_size)


def test_sharded_llada_matches_single(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_dirs["llada"]
    tensors = load_file(str(src / "model.safetensors"))
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in halves.items():
        save_file({k: tensors[k] for k in ks}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: n for n, ks in halves.items() for k in ks}}))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    ids = torch.randint(0, 100, (1, 9))
    torch.testing.assert_close(load_model(tmp_path).forward(ids), load_model(src).forward(ids))


def test_bidirectional_and_causal(tiny_dirs):
    ids = torch.randint(4, 100, (1, 8))
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 1) % 100
    for family, expect_change in (("llada", True), ("dream", True), ("causal", False)):
        lm = load_model(tiny_dirs[family])
        changed = (lm.forward(ids)[0, 0] - lm.forward(other)[0, 0]).abs().max() > 1e-6
        assert bool(changed) == expect_change, family


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_padding_does_not_change_real_positions(tiny_dirs, family):
    lm = load_model(tiny_dirs[family])
    ids = torch.randint(4, 100, (1, 6))
    ref = lm.forward(ids)
    pad = torch.zeros(1, 3, dtype=torch.long)
    right = lm.forward(torch.cat([ids, pad], 1), torch.tensor([[1] * 6 + [0] * 3]))[:, :6]
    torch.testing.assert_close(right, ref, atol=1e-5, rtol=1e-5)


def test_bf16_forward(tiny_dirs):
    lm = load_model(tiny_dirs["llada"], dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    assert torch.isfinite(lm.forward(torch.randint(0, 100, (1, 5))).float()).all()


def test_bad_inputs(tmp_path, tiny_dirs):
    with pytest.raises(DLMScopeError, match="neither a checkpoint folder"):
        load_model(tmp_path / "missing")
    with pytest.raises(DLMScopeError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(DLMScopeError, match="unknown family"):
        load_model(tiny_dirs["llada"], family="gpt7")
    with pytest.raises(DLMScopeError, match="unknown backend"):
        load_model(tiny_dirs["llada"], backend="magic")
    with pytest.raises(DLMScopeError, match="unknown built-in model .*known: dlmscope-tiny-dlm"):
        from dlmscope.models.zoo import builtin_path
        builtin_path("dlmscope-huge")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_dirs["llada"] / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(DLMScopeError, match="cannot read weights file"):
        load_model(bad)
    lm = load_model(tiny_dirs["llada"])
    with pytest.raises(DLMScopeError, match="out of range"):
        lm.site("blocks.9.hook_resid_post")
    causal = load_model(tiny_dirs["causal"])
    with pytest.raises(DLMScopeError, match="no mask token"):
        causal.require_mask_id()


def test_transformer_lens_model_wraps():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    ht = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=16, d_head=8, d_vocab=50, act_fn="gelu"))
    lm = load_model(ht)
    assert lm.causal and lm.family == "transformer_lens" and lm.n_layers == 2
    from dlmscope.hooks import run_with_cache

    ids = torch.randint(0, 50, (1, 6))
    acts = run_with_cache(lm, ids, ["blocks.1.hook_resid_post"])
    _, cache = ht.run_with_cache(ids)
    torch.testing.assert_close(acts["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"])


def test_masked_lm_loads(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, mask_token="[MASK]", pad_token="[PAD]", unk_token="[UNK]")
    BertForMaskedLM(BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(str(tmp_path))
    hf_tok.save_pretrained(str(tmp_path))
    lm = load_model(tmp_path)
    assert lm.family == "masked_lm" and lm.mask_id == 4 and not lm.causal
    assert lm.denoise_logits(torch.tensor([[5, 4, 6]])).shape == (1, 3, 8)
