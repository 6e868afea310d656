import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.sae import SAEConfig, SAETrainer, TopKSAE, TrainConfig, load_sae, load_sae_dir, save_sae


def _sae(arch="topk"):
    torch.manual_seed(0)
    tr = SAETrainer(SAEConfig(16, 64, 4, arch, {"model_name": "m", "hook_name": "blocks.0.hook_resid_post"}),
                    TrainConfig(total_tokens=128 * 10, batch_size=128))
    for _ in range(10):
        tr.step(torch.randn(128, 16) * 5 + 2)
    return tr


def test_topk_keeps_k_and_decoder_unit_norm():
    tr = _sae()
    x = torch.randn(32, 16) * 5
    assert ((tr.sae.encode(x) > 0).sum(-1) <= 4).all()
    torch.testing.assert_close(tr.sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(tr.sae.decode(tr.sae.encode(x)), tr.sae.reconstruct(x), atol=1e-4, rtol=1e-4)


def test_parallel_gradient_removed():
    sae = TopKSAE(SAEConfig(8, 16, 2))
    sae.W_dec.grad = sae.W_dec.detach().clone() * 3 + torch.randn(16, 8)
    sae.remove_parallel_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5


def test_folding_scale_leaves_outputs_unchanged():
    tr = _sae()
    x = torch.randn(20, 16) * 5
    before_lat, before_rec = tr.sae.encode(x), tr.sae.reconstruct(x)
    assert float(tr.sae.input_scale) != 1.0
    tr.sae.fold_input_scale()
    torch.testing.assert_close(tr.sae.encode(x), before_lat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tr.sae.reconstruct(x), before_rec, atol=1e-4, rtol=1e-4)


def test_auxk_formula_uses_only_dead_latents_without_b_dec():
    tr = _sae()
    sae = tr.sae
    x = torch.randn(64, 16) * 5
    tr.since_fired[:] = 0
    assert tr.step(x)["aux"] == 0.0  # nothing dead, no auxiliary loss
    tr.since_fired[:] = 0
    tr.since_fired[:5] = tr.dead_tokens  # latents 0..4 dead
    with torch.no_grad():
        out = sae.forward_train(x)
        e = out.x - out.recon
        pre = out.pre[:, :5]
        vals, idx = pre.topk(min(tr.k_aux, 5), dim=-1)
        e_hat = torch.relu(vals)[..., None].mul(sae.W_dec[idx]).sum(1)  # dead latents only, no b_dec
        expected = ((e - e_hat) ** 2).sum(-1).mean() / ((e - e.mean(0)) ** 2).sum(-1).mean() * min(5 / tr.k_aux, 1)
    logs = tr.step(x)
    assert abs(logs["aux"] - float(expected)) < 1e-3 * max(1.0, float(expected))
    assert logs["dead_fraction"] == 5 / 64


def test_state_dict_roundtrip_continues_identically():
    a = _sae()
    b = SAETrainer(a.sae.cfg, a.cfg)
    b.load_state_dict(a.state_dict())
    x = torch.randn(128, 16) * 5
    a.step(x), b.step(x)
    torch.testing.assert_close(a.sae.W_enc, b.sae.W_enc)


def test_learns_synthetic_dictionary():
    torch.manual_seed(1)
    D = torch.nn.functional.normalize(torch.randn(128, 32), dim=1)
    tr = SAETrainer(SAEConfig(32, 128, 4), TrainConfig(total_tokens=300 * 512, batch_size=512, lr=3e-3))
    for _ in range(300):
        idx = torch.randint(0, 128, (512, 3))
        x = torch.nn.functional.embedding_bag(idx, D, per_sample_weights=torch.rand(512, 3) + 0.5, mode="sum")
        logs = tr.step(x)
    assert logs["fvu"] < 0.35  # from ~1.0 at initialisation


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_saelens_loads_our_files_identically(tmp_path, arch):
    from sae_lens import SAE

    tr = _sae(arch)
    save_sae(tr.sae, tmp_path / "sae", density=torch.rand(64))
    x = torch.randn(10, 16) * 5
    ours = load_sae_dir(tmp_path / "sae")
    torch.testing.assert_close(ours.encode(x), tr.sae.encode(x), atol=1e-5, rtol=1e-5)
    if arch == "topk":
        theirs = SAE.load_from_disk(str(tmp_path / "sae"))
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), atol=1e-5, rtol=1e-5)


def test_dictionary_learning_and_sparsify_formats(tmp_path):
    import json

    from safetensors.torch import save_file

    tr = _sae()
    tr.sae.fold_input_scale()
    s = tr.sae
    x = torch.randn(6, 16) * 5
    dl = tmp_path / "dl"
    dl.mkdir()
    torch.save({"encoder.weight": s.W_enc.t().detach(), "encoder.bias": s.b_enc.detach(),
                "decoder.weight": s.W_dec.t().detach(), "b_dec": s.b_dec.detach(), "k": torch.tensor(4)}, dl / "ae.pt")
    (dl / "config.json").write_text(json.dumps({"trainer": {"k": 4, "lm_name": "m", "layer": 0}}))
    sp = tmp_path / "sp"
    sp.mkdir()
    save_file({"encoder.weight": s.W_enc.t().detach().contiguous(), "encoder.bias": s.b_enc.detach(),
               "W_dec": s.W_dec.detach(), "b_dec": s.b_dec.detach()}, str(sp / "sae.safetensors"))
    (sp / "cfg.json").write_text(json.dumps({"k": 4, "num_latents": 64, "d_in": 16}))
    for folder in (dl, sp):
        torch.testing.assert_close(load_sae_dir(folder).reconstruct(x), s.reconstruct(x), atol=1e-4, rtol=1e-4)


def test_bad_sae_inputs(tmp_path):
    with pytest.raises(DLMScopeError, match="0 < k < n_latents"):
        SAEConfig(16, 16, 16)
    tr = _sae()
    with pytest.raises(DLMScopeError, match="d_in=8 but the SAE expects d_in=16"):
        tr.sae.encode(torch.randn(2, 8))
    save_sae(tr.sae, tmp_path / "sae")
    (tmp_path / "sae" / "sae_weights.safetensors").write_bytes(b"corrupt")
    with pytest.raises(DLMScopeError, match="cannot read SAE weights"):
        load_sae(tmp_path / "sae")
    with pytest.raises(DLMScopeError, match="unknown SAE 'nope'"):
        load_sae("nope")
    assert load_sae("tiny-dlm-L1-k32").cfg.hook_name == "blocks.1.hook_resid_post"
