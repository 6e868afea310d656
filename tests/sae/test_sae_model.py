import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.sae import ARCHITECTURES, SAE, SAEConfig, build_sae
from dlmscope.sae.model import SAELENS_READERS, _LatentPattern, _SparseDecode, register_architecture


def test_config_validation():
    with pytest.raises(DLMScopeError, match="0 < k < n_latents"):
        SAEConfig(16, 16, 16)
    with pytest.raises(DLMScopeError, match="unknown SAE architecture 'relu'"):
        SAEConfig(16, 64, 4, "relu")


def test_init_decoder_unit_rows_and_encoder_is_transpose():
    sae = SAE(SAEConfig(8, 32, 2), seed=3)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert sae.W_enc.shape == (8, 32) and sae.b_enc.shape == (32,) and sae.b_dec.shape == (8,)


def test_topk_keeps_exactly_k(raw_x):
    sae = SAE(SAEConfig(16, 64, 4))
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive: ReLU removes none of the top k
    lat = sae.encode(raw_x)
    assert ((lat > 0).sum(-1) == 4).all()
    values, indices = sae.encode_topk(raw_x)
    assert values.shape == indices.shape == (40, 4)
    pre = sae.pre_acts(raw_x)
    torch.testing.assert_close(values.sort(-1).values, pre.topk(4, -1).values.sort(-1).values)


def test_decode_routes_agree(trained, raw_x):
    sae = trained.sae
    dense = sae.decode(sae.encode(raw_x))
    torch.testing.assert_close(sae.decode(sae.encode_topk(raw_x)), dense, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae.reconstruct(raw_x), dense, atol=1e-4, rtol=1e-4)
    out = sae(raw_x)  # training forward works in the scaled space
    torch.testing.assert_close(out.recon / sae.input_scale, dense, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.latents, sae.encode(raw_x), atol=1e-5, rtol=1e-5)
    assert sae.encode(raw_x[None]).shape == (1, 40, 64)  # leading dims are kept


# of 16 dead latents: the positive ones among 6 (few: no top-k) or all 16; 6 of all-positive ones (a top-k); none positive
@pytest.mark.parametrize("aux_route", ["ragged", "dense"])
@pytest.mark.parametrize(("k_aux", "dead_bias"), [(6, None), (16, None), (6, 1.0), (3, -50.0)])
def test_sparse_route_gradients_match_dense_autograd(k_aux, dead_bias, aux_route, monkeypatch):
    """The CPU route's hand-written backward (sparse matmuls, sampled dots, b_dec from b_enc; AuxK's entries either
    ragged, only positive dead pre-activations kept, or dense over the dead columns) against autograd on the plain
    dense maths, in float64 to 1e-5, with AuxK on and some selected pre-activations cut by the ReLU."""
    from dlmscope.sae import model

    monkeypatch.setattr(model, "_dense_aux", lambda *shape: aux_route == "dense")
    gen = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(8, 48, 5), seed=2).double()
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(48, generator=gen, dtype=torch.double) - 2.5)
        if dead_bias is not None:
            sae.b_enc[dead] = dead_bias
        sae.b_dec.copy_(torch.randn(8, generator=gen, dtype=torch.double))
        sae.input_scale.fill_(0.7)
    x = torch.randn(32, 8, generator=gen, dtype=torch.double)
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)

    def grads(out):
        sae.zero_grad()
        ((out.recon - out.x).pow(2).sum() + (out.aux_recon - out.x).pow(2).sum()).backward()
        return [p.grad.clone() for p in params]

    out = sae(x, dead, k_aux)
    assert (out.values > 0).any() and ((out.values == 0).any() or dead_bias == 1.0)  # 1.0: dead latents lead
    ours = grads(out)
    xs = x * sae.input_scale  # the plain dense computation, written out
    pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    dense = torch.zeros_like(pre).scatter(1, out.indices, pre.gather(1, out.indices).relu())
    aux_ids = torch.arange(0, 48, 3)[pre.detach()[:, ::3].topk(k_aux, dim=-1).indices]
    aux = torch.zeros_like(pre).scatter(1, aux_ids, pre.gather(1, aux_ids).relu())
    ref = type(out)(xs, dense @ sae.W_dec + sae.b_dec, out.values, out.indices, 48, aux @ sae.W_dec)
    torch.testing.assert_close(out.recon, ref.recon)
    torch.testing.assert_close(out.aux_recon, ref.aux_recon)
    assert (ref.aux_recon.abs().max() > 0.1) == (dead_bias != -50.0)
    for got, want in zip(ours, grads(ref)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert want.abs().max() > 0.1  # a real gradient, not zeros on both sides


def test_auxk_route_rule_matches_its_documented_break_even():
    """Dense below about 25 dead latents whatever their activations; from about 10% positive at 128 dead, 11% at 512."""
    from dlmscope.sae.model import _dense_aux

    n = 4096
    assert _dense_aux(n, 24, 0) and not _dense_aux(n, 26, 0)
    assert not _dense_aux(n, 128, round(0.09 * n * 128)) and _dense_aux(n, 128, round(0.10 * n * 128))
    assert not _dense_aux(n, 512, round(0.10 * n * 512)) and _dense_aux(n, 512, round(0.12 * n * 512))


@pytest.mark.parametrize("n_latents", [20, 40_000])  # latent ids sorted as int16, and as int32 past 2^15
def test_sparse_decode_gradients_match_dense_autograd(n_latents):
    """The decoder's sparse backward (latent-major sparse matmul, sampled dot products) against the dense maths,
    with latents repeated across tokens and a zero activation."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n_latents, 8, generator=gen, dtype=torch.double, requires_grad=True)
    values = torch.rand(30, 4, generator=gen, dtype=torch.double)
    values[0, 0] = 0.0
    values.requires_grad_(True)
    pool = torch.tensor([0, 3, 7, 11, 13, n_latents - 1])  # few latents, so tokens share them; the top id too
    indices = torch.stack([pool[torch.randperm(6, generator=gen)[:4]] for _ in range(30)])
    grad_out = torch.randn(30, 8, generator=gen, dtype=torch.double)
    out, _ = _SparseDecode.apply(values, values.new_empty(0), w, _LatentPattern(indices, n_latents), None)
    out.backward(grad_out)
    ours = [values.grad.clone(), w.grad.clone()]
    values.grad = w.grad = None
    ref = values.new_zeros(30, n_latents).scatter(1, indices, values) @ w
    torch.testing.assert_close(out, ref)
    ref.backward(grad_out)
    for got, t in zip(ours, (values, w)):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ragged", [False, True])
def test_scatter_matmul_writes_every_row_of_its_uninitialised_result(monkeypatch, dtype, ragged):
    """The weight-gradient product writes into an uninitialised result (beta 0), so rows without entries must come
    out zero whatever that memory held: here it holds NaN, the worst garbage. Both layouts: a fixed number of
    entries per token, and ragged (AuxK's, with a token that has none)."""
    if ragged:  # tokens 0, 0, 2 (token 1 has no entries) over columns 0, 2, 5
        pattern = _LatentPattern(torch.tensor([0, 2, 5]), 8, torch.tensor([0, 0, 2]), torch.tensor([0, 2, 2]))
        values = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
        dense_g = torch.zeros(3, 8, dtype=dtype).index_put_((pattern.tokens, pattern.indices), values)
    else:
        pattern = _LatentPattern(torch.tensor([[0, 2], [2, 5]]), 8)
        values = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype)
        dense_g = torch.zeros(2, 8, dtype=dtype).scatter(1, pattern.indices, values)
    dense = torch.randn(dense_g.shape[0], 3, dtype=dtype)
    filled = []

    def nan_empty(self, *size, **kw):
        filled.append(size)
        return torch.full(size, float("nan"), dtype=self.dtype)

    monkeypatch.setattr(torch.Tensor, "new_empty", nan_empty)
    got = pattern.scatter_matmul(values, dense)
    assert filled  # the result really came from the NaN-filled memory
    torch.testing.assert_close(got, dense_g.t() @ dense)


def test_parallel_gradient_removed_and_rows_renormalised():
    sae = SAE(SAEConfig(8, 16, 2))
    sae.W_dec.grad = sae.W_dec.detach().clone() * 3 + torch.randn(16, 8)
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    w = sae.W_dec.detach()
    torch.testing.assert_close(sae.W_dec.grad, before - (before * w).sum(1, keepdim=True) * w)
    with torch.no_grad():
        sae.W_dec.mul_(2.5)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_folding_input_scale_leaves_outputs_unchanged(make_trainer, raw_x, arch):
    sae = make_trainer(arch).sae
    assert float(sae.input_scale) != 1.0
    lat, rec, pre = sae.encode(raw_x), sae.reconstruct(raw_x), sae.pre_acts(raw_x)
    sae.fold_input_scale()
    assert float(sae.input_scale) == 1.0
    torch.testing.assert_close(sae.pre_acts(raw_x), pre, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae.encode(raw_x), lat, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae.reconstruct(raw_x), rec, atol=1e-4, rtol=1e-4)


def test_batchtopk_training_keeps_k_per_token_on_average(raw_x):
    sae = build_sae(SAEConfig(16, 64, 4, "batchtopk"))
    with torch.no_grad():
        sae.b_enc.fill_(100.0)
    out = sae(raw_x)
    assert int((out.values > 0).sum()) == 4 * 40
    assert (out.values > 0).sum(-1).max() > 0 and out.indices is None


def test_wrong_width_is_one_line_error():
    sae = SAE(SAEConfig(16, 64, 4, metadata={"hook_name": "blocks.1.hook_resid_post"}))
    with pytest.raises(DLMScopeError, match=r"d_in=8 but the SAE expects d_in=16 \(hook blocks.1.hook_resid_post\)"):
        sae.encode(torch.randn(2, 8))


def test_dense_route_equals_sparse_route(trained, raw_x, monkeypatch):
    """GPUs take the dense route; both must give the same outputs and gradients."""
    from dlmscope.sae import model

    sae = trained.sae
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    results = []
    for sparse in (True, False):
        monkeypatch.setattr(model, "_sparse_route", lambda x: sparse)
        sae.zero_grad()
        out = sae(raw_x, dead, 8)
        ((out.recon - out.x).pow(2).sum() + out.aux_recon.pow(2).sum()).backward()
        results.append((out.recon.detach(), out.aux_recon.detach(), out.latents.detach(),
                        *(p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_every_architecture_is_registered_once_by_its_class():
    assert list(ARCHITECTURES) == ["topk", "batchtopk", "jumprelu", "matryoshka", "transcoder", "skip_transcoder"]
    for name, cls in ARCHITECTURES.items():
        assert cls.architecture == name and issubclass(cls, SAE)
        meta = {"hook_name": "blocks.0.hook_mlp_in", "hook_name_out": "blocks.0.hook_mlp_out"}
        assert type(build_sae(SAEConfig(8, 32, 2, name, meta))) is cls
    assert SAELENS_READERS == {"topk": "topk", "jumprelu": "jumprelu", "jumprelu_transcoder": "transcoder",
                               "jumprelu_skip_transcoder": "skip_transcoder"}
    with pytest.raises(ValueError, match="registered twice"):
        register_architecture("topk", saved_as="topk")(SAE)


def test_a_class_builds_only_its_own_architecture():
    with pytest.raises(DLMScopeError, match="SAE builds 'topk' SAEs, not 'batchtopk'; use dlmscope.sae.build_sae"):
        SAE(SAEConfig(16, 64, 4, "batchtopk"))
