import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlmscope import DLMScopeError
from dlmscope.sae import load_sae_dir, save_sae
from dlmscope.sae import io as sae_io


SAELENS_CLASS = {"topk": "TopKSAE", "batchtopk": "JumpReLUSAE", "jumprelu": "JumpReLUSAE", "matryoshka": "JumpReLUSAE",
                 "transcoder": "JumpReLUTranscoder", "skip_transcoder": "JumpReLUSkipTranscoder"}


@pytest.mark.parametrize("arch", list(SAELENS_CLASS))
def test_saelens_loads_our_files_with_identical_encodings(make_trainer, raw_x, tmp_path, arch):
    from sae_lens import SAE

    tr = make_trainer(arch)
    density = torch.rand(64)
    save_sae(tr.sae, tmp_path / "sae", density=density)
    theirs = SAE.load_from_disk(str(tmp_path / "sae"))
    assert type(theirs).__name__ == SAELENS_CLASS[arch]
    ours = load_sae_dir(tmp_path / "sae")
    torch.testing.assert_close(ours.encode(raw_x), tr.sae.encode(raw_x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(raw_x), ours.encode(raw_x))
        torch.testing.assert_close(theirs(raw_x), ours.reconstruct(raw_x))
    assert ours.cfg.architecture == arch and ours.cfg.k == 4 and ours.cfg.prefix_sizes == tr.sae.cfg.prefix_sizes
    assert ours.cfg.metadata["masking_policy"] == "mask" and ours.cfg.metadata["t_range"] == [0.05, 0.5]
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == tr.sae.cfg.hook_name and theirs.cfg.metadata.model_name == "m"
    torch.testing.assert_close(load_file(str(tmp_path / "sae" / "sparsity.safetensors"))["sparsity"],
                               torch.log10(density))


def test_reads_saelens_own_jumprelu_files(tmp_path, raw_x):
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    theirs = JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=64))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
        theirs.threshold.abs_()
    theirs.save_model(str(tmp_path / "sl"))
    ours = load_sae_dir(tmp_path / "sl")
    assert ours.cfg.architecture == "jumprelu"
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(raw_x), theirs.encode(raw_x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.reconstruct(raw_x), theirs(raw_x), atol=1e-4, rtol=1e-4)


def test_reads_saelens_own_topk_files_with_decoder_norm_rescaling(tmp_path, raw_x):
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    theirs = TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=4, rescale_acts_by_decoder_norm=True,
                                   apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    theirs.save_model(str(tmp_path / "sl"))
    ours = load_sae_dir(tmp_path / "sl")
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(raw_x), theirs.encode(raw_x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.reconstruct(raw_x), theirs.decode(theirs.encode(raw_x)), atol=1e-4, rtol=1e-4)


def _dictionary_learning_reference(w, x, k, threshold=None):
    """AutoEncoderTopK / BatchTopKSAE maths: f = topk(relu(encoder(x - b_dec))), x_hat = decoder(f) + b_dec."""
    post = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].t() + w["encoder.bias"])
    if threshold is None:
        top = post.topk(k, dim=-1)
        f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    else:
        f = post * (post > threshold)
    return f, f @ w["decoder.weight"].t() + w["b_dec"]


@pytest.mark.parametrize("dict_class", ["AutoEncoderTopK", "BatchTopKSAE"])
def test_dictionary_learning_format(tmp_path, raw_x, dict_class):
    gen = torch.Generator().manual_seed(0)
    w = {"encoder.weight": torch.randn(64, 16, generator=gen), "encoder.bias": torch.randn(64, generator=gen),
         "decoder.weight": torch.randn(16, 64, generator=gen), "b_dec": torch.randn(16, generator=gen),
         "k": torch.tensor(4, dtype=torch.int), "threshold": torch.tensor(0.7)}
    torch.save(w, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps(
        {"trainer": {"dict_class": dict_class, "k": 4, "lm_name": "Dream-org/Dream-v0-Base-7B", "layer": 5,
                     "submodule_name": "resid_post_layer_5"}}))
    sae = load_sae_dir(tmp_path)
    f, x_hat = _dictionary_learning_reference(w, raw_x, 4, 0.7 if dict_class == "BatchTopKSAE" else None)
    torch.testing.assert_close(sae.encode(raw_x), f, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae.decode(sae.encode(raw_x)), x_hat, atol=1e-4, rtol=1e-4)
    assert sae.cfg.hook_name == "blocks.5.hook_resid_post" and sae.cfg.model_name == "Dream-org/Dream-v0-Base-7B"


def test_sparsify_format_written_by_sparsify_and_by_hand(tmp_path, raw_x):
    from sparsify import SparseCoder, SparseCoderConfig

    sc = SparseCoder(16, SparseCoderConfig(num_latents=64, k=4))
    with torch.no_grad():
        sc.b_dec.copy_(torch.randn(16))
        sc.encoder.bias.copy_(torch.randn(64) * 0.1)
    sc.save_to_disk(tmp_path / "layers.3")
    ours = load_sae_dir(tmp_path / "layers.3")
    with torch.no_grad():
        top_acts, top_idx, _ = sc.encode(raw_x)
        ref = torch.zeros(40, 64).scatter(-1, top_idx, top_acts)
        torch.testing.assert_close(ours.encode(raw_x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.reconstruct(raw_x), sc.decode(top_acts, top_idx), atol=1e-5, rtol=1e-5)
    assert ours.cfg.metadata["source_hookpoint"] == "layers.3"
    with pytest.raises(DLMScopeError, match="several SAEs, pass one of: layers.3"):
        load_sae_dir(tmp_path)
    hand = tmp_path / "hand"  # the same layout written without sparsify
    hand.mkdir()
    save_file({"encoder.weight": sc.encoder.weight.detach().clone(), "encoder.bias": sc.encoder.bias.detach().clone(),
               "W_dec": sc.W_dec.detach().clone(), "b_dec": sc.b_dec.detach().clone()}, str(hand / "sae.safetensors"))
    (hand / "cfg.json").write_text(json.dumps({"k": 4, "num_latents": 64, "d_in": 16, "activation": "topk"}))
    torch.testing.assert_close(load_sae_dir(hand).reconstruct(raw_x), ours.reconstruct(raw_x))


def test_save_is_atomic_and_replaces(make_trainer, tmp_path, monkeypatch, raw_x):
    a, b = make_trainer(steps=2).sae, make_trainer(steps=6).sae
    save_sae(a, tmp_path / "sae")
    good = load_sae_dir(tmp_path / "sae").reconstruct(raw_x)
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_sae(b, tmp_path / "sae")
    monkeypatch.undo()
    torch.testing.assert_close(load_sae_dir(tmp_path / "sae").reconstruct(raw_x), good)
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temporary folders left behind
    save_sae(b, tmp_path / "sae")  # replacing works and leaves nothing else
    torch.testing.assert_close(load_sae_dir(tmp_path / "sae").reconstruct(raw_x), b.reconstruct(raw_x),
                               atol=1e-4, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_bad_files_give_one_line_errors_naming_the_file(trained, tmp_path):
    save_sae(trained.sae, tmp_path / "sae")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    cases = [(tmp_path / "sae", "sae_weights.safetensors")]
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "cfg.json").write_text("{not json")
    save_file({"W_enc": torch.zeros(2, 2)}, str(tmp_path / "cfg" / "sae_weights.safetensors"))
    cases.append((tmp_path / "cfg", "cfg.json"))
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "ae.pt").write_bytes(b"\x80garbage")
    cases.append((tmp_path / "dl", "ae.pt"))
    (tmp_path / "missing").mkdir()
    save_file({"W_enc": torch.zeros(2, 2)}, str(tmp_path / "missing" / "sae_weights.safetensors"))
    (tmp_path / "missing" / "cfg.json").write_text(json.dumps({"d_in": 2, "d_sae": 2, "k": 1}))
    cases.append((tmp_path / "missing", "lacks 'b_enc'"))
    for folder, needle in cases:
        with pytest.raises(DLMScopeError) as err:
            load_sae_dir(folder)
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DLMScopeError, match="no known SAE format"):
        load_sae_dir(tmp_path / "missing" / "..")
    with pytest.raises(DLMScopeError, match="does not exist"):
        load_sae_dir(tmp_path / "nope")


def test_saved_cfg_has_what_saelens_needs(trained, tmp_path):
    save_sae(trained.sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "k", "dtype", "device", "apply_b_dec_to_input",
                "normalize_activations", "reshape_activations", "metadata"):
        assert key in cfg
    for key in ("model_name", "hook_name", "context_size", "dataset_path", "sae_lens_version"):
        assert key in cfg["metadata"]
    assert cfg["metadata"]["sae_lens_version"] == sae_io.SAELENS_FORMAT_VERSION


def test_damaged_weights_never_load_silently(trained, tmp_path):
    """NaN rows (every reader), thousands of flipped bytes in our own files, and malformed configs: one line each."""
    def refused(folder, needle):
        with pytest.raises(DLMScopeError) as err:
            load_sae_dir(folder)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)

    save_sae(trained.sae, tmp_path / "ours")
    weights = tmp_path / "ours" / "sae_weights.safetensors"
    raw = bytearray(weights.read_bytes())
    gen = torch.Generator().manual_seed(0)
    start = 8 + int.from_bytes(raw[:8], "little")  # past the JSON header: only float bytes change
    for i in torch.randint(start, len(raw), (2000,), generator=gen).tolist():
        raw[i] ^= 0x04  # low mantissa/exponent bits: mostly finite garbage
    weights.write_bytes(bytes(raw))
    refused(tmp_path / "ours", "sae_weights.safetensors' are corrupt (checksum mismatch with cfg.json)")

    w = {n: getattr(trained.sae, n).detach().contiguous().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    w["W_dec"][3] = float("nan")
    cfg = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    del cfg["metadata"]["dlmscope_weights_sha256"]  # a file written by another tool: no checksum
    (tmp_path / "nan").mkdir()
    save_file(w, str(tmp_path / "nan" / "sae_weights.safetensors"))
    (tmp_path / "nan" / "cfg.json").write_text(json.dumps(cfg))
    refused(tmp_path / "nan", f"tensor W_dec has {w['W_dec'].shape[1]} non-finite value(s) (first at index (3, 0))")
    for key, value, needle in (("k", "abc", "k='abc' must be an integer"), ("k", 2.5, "k=2.5 must be an integer"),
                               ("metadata", ["a"], "metadata must be a JSON object, not list"),
                               ("d_in", True, "d_in=True must be an integer")):
        (tmp_path / "nan" / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        refused(tmp_path / "nan", needle)

    (tmp_path / "dl").mkdir()
    torch.save({"encoder.weight": torch.randn(8, 4), "encoder.bias": torch.full((8,), float("inf")),
                "decoder.weight": torch.randn(4, 8), "b_dec": torch.zeros(4), "k": torch.tensor(2)},
               tmp_path / "dl" / "ae.pt")
    refused(tmp_path / "dl", "ae.pt': tensor b_enc has 8 non-finite value(s)")
    (tmp_path / "sp").mkdir()
    save_file({"encoder.weight": torch.randn(8, 4), "encoder.bias": torch.zeros(8),
               "W_dec": torch.full((8, 4), float("nan")), "b_dec": torch.zeros(4)}, str(tmp_path / "sp" / "sae.safetensors"))
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps({"k": "2"}))
    refused(tmp_path / "sp", "k='2' must be an integer")
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps({"k": 2}))
    refused(tmp_path / "sp", "sae.safetensors': tensor W_dec has 32 non-finite value(s)")
