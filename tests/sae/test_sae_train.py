import math

import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig


def test_defaults_lr_k_aux_and_dead_window():
    for arch, want in (("topk", "signum_sf"), ("batchtopk", "adam"), ("jumprelu", "adam")):  # the measured default
        assert SAETrainer(SAEConfig(32, 2**12, 8, arch), TrainConfig(total_tokens=10_000, batch_size=1000)).optimizer \
            == want
    tr = SAETrainer(SAEConfig(32, 2**12, 8), TrainConfig(total_tokens=1_000_000, batch_size=1000, optimizer="adam"))
    assert math.isclose(tr.lr, 2e-4 / math.sqrt(2**12 / 2**14))
    assert tr.k_aux == 16 and tr.cfg.aux_coef == 1 / 32
    assert tr.dead_tokens == 200_000  # min(10M, total_tokens // 5)
    assert tr.warmup_steps == 50 and tr.lr_at(0) == pytest.approx(tr.lr / 50)
    sf = SAETrainer(SAEConfig(32, 2**12, 8), TrainConfig(total_tokens=1_000_000, batch_size=1000))
    assert math.isclose(sf.lr, 2.5e-3 / math.sqrt(2**12 / 2**14)) and sf.warmup_steps == 10
    assert sf.lr_at(9) == sf.lr and sf.lr_at(0) == pytest.approx(sf.lr / 10)
    assert SAETrainer(SAEConfig(32, 64, 8), TrainConfig(total_tokens=10**9, batch_size=1000)).dead_tokens == 10_000_000
    with pytest.raises(DLMScopeError, match="b_dec_init='median'"):
        TrainConfig(b_dec_init="median")


@pytest.mark.parametrize("n_dead", [4, 40])  # scale n_dead / k_aux, and capped at 1
def test_aux_loss_is_the_documented_formula(n_dead):
    """AuxK = min(n_dead / k_aux, 1) * mean_i |e_i - e_hat_i|^2 / mean_i |e_i - mean(e)|^2, the same through the
    fused single-process path and the all-reduce path (an identity reduce), with gradient only into e_hat."""
    from dlmscope.sae.train import aux_loss

    gen = torch.Generator().manual_seed(0)
    err = torch.randn(50, 6, generator=gen, dtype=torch.double) + 3.0  # a mean far from 0
    pred = torch.randn(50, 6, generator=gen, dtype=torch.double, requires_grad=True)
    want = ((err - pred).pow(2).sum(1).mean() / (err - err.mean(0)).pow(2).sum(1).mean() * min(n_dead / 16, 1.0))
    for reduce in (None, lambda t: t):
        torch.testing.assert_close(aux_loss(-err, pred, n_dead, 16, reduce), want)  # it reads x_hat - x = -e
    miss = (-err).requires_grad_(True)
    aux_loss(miss, pred, n_dead, 16, None).backward()
    assert miss.grad is None and pred.grad.abs().sum() > 0


@pytest.mark.parametrize("offset", [0.0, 30.0, 3000.0])
def test_aux_loss_variance_keeps_its_digits_when_the_mean_dominates(offset):
    """In float32 the one-pass variance E|e|^2 - |E e|^2 cancels when the residual's mean dwarfs its spread; the loss
    must still match the float64 two-pass formula (mean^2 / variance: 0, about 900 and about 9,000,000)."""
    from dlmscope.sae.train import aux_loss

    gen = torch.Generator().manual_seed(1)
    err = torch.randn(256, 8, generator=gen, dtype=torch.double) + offset
    pred = torch.randn(256, 8, generator=gen, dtype=torch.double) + offset
    want = (err - pred).pow(2).sum(1).mean() / (err - err.mean(0)).pow(2).sum(1).mean()
    for reduce in (None, lambda t: t):
        got = aux_loss(-err.float(), pred.float(), 16, 16, reduce)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0.0)


def _mse_loss_gradients(sae, x, dead, k_aux, n_dead):
    """Every parameter's gradient under the formulation the trainer's losses replaced: F.mse_loss for the MSE and
    for AuxK's error, AuxK's variance in one pass E|e|^2 - |E e|^2, then the decoder's parallel gradient removed."""
    import torch.nn.functional as F

    sae.zero_grad(set_to_none=True)
    out = sae(x, dead, k_aux)
    e = (out.x - out.recon).detach()
    flat = e.flatten()
    variance = torch.dot(flat, flat) / e.shape[0] - e.mean(0).pow(2).sum()
    assert variance >= 1e-3 * torch.dot(flat, flat) / e.shape[0]  # the one-pass branch, as in the trainer
    aux = F.mse_loss(out.aux_recon, e, reduction="sum") / e.shape[0] / variance.clamp_min(1e-12) * min(n_dead / k_aux, 1)
    (F.mse_loss(out.recon, out.x, reduction="sum") / e.shape[0] + aux / 32).backward()
    sae.remove_parallel_grad()
    return {n: p.grad for n, p in sae.named_parameters()}


@pytest.mark.parametrize(("aux_route", "k_aux"), [("dense", 64), ("ragged", 64), ("ragged", 3)])  # 3: AuxK's top-k
def test_step_gradients_are_bit_for_bit_those_of_mse_loss(aux_route, k_aux, monkeypatch):
    """`SAETrainer.step` reads one difference x_hat - x for both losses and backpropagates through
    `sum_of_squares`; the gradients it leaves (adam keeps them) are exactly those of the F.mse_loss formulation it
    replaced, on either AuxK route and with AuxK's top-k, so results from before the change stay reproducible."""
    import copy

    from dlmscope.sae import model

    monkeypatch.setattr(model, "_dense_aux", lambda *shape: aux_route == "dense")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3)) + 0.3
    tr = SAETrainer(SAEConfig(16, 128, 4), TrainConfig(total_tokens=640, batch_size=64, optimizer="adam",
                                                       k_aux=k_aux))
    tr.step(x)  # initialised, then a third of the latents dead
    tr.since_fired[::3] = tr.dead_tokens
    dead, n_dead = tr.since_fired >= tr.dead_tokens, int((tr.since_fired >= tr.dead_tokens).sum())
    want = _mse_loss_gradients(copy.deepcopy(tr.sae), x, dead, tr.k_aux, n_dead)
    assert tr.step(x)["aux"] > 0
    for name, p in tr.sae.named_parameters():
        assert torch.equal(p.grad, want[name]), name


def test_schedule_warmup_constant_linear_decay_to_zero():
    tr = SAETrainer(SAEConfig(8, 32, 2), TrainConfig(total_tokens=100 * 10, batch_size=10, lr=1.0, warmup_steps=10,
                                                     optimizer="adam"))
    lrs = [tr.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80])
    assert lrs[80] == pytest.approx(1.0) and lrs[90] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_initialisation_unit_mean_squared_norm_and_b_dec(raw_x):
    for init in ("mean", "geometric_median"):
        tr = SAETrainer(SAEConfig(16, 64, 4), TrainConfig(total_tokens=400, batch_size=40, b_dec_init=init))
        tr.initialise(raw_x)
        xs = raw_x * tr.sae.input_scale
        assert float((xs ** 2).sum(-1).mean()) == pytest.approx(1.0, rel=1e-5)
        if init == "mean":
            torch.testing.assert_close(tr.sae.b_dec.detach(), xs.mean(0))
        else:  # the geometric median has a smaller sum of distances than the mean
            dist = lambda y: float((xs - y).norm(dim=1).sum())  # noqa: E731
            assert dist(tr.sae.b_dec.detach()) < dist(xs.mean(0))
    # An all-zero first batch (a diff-SAE's differences of identical checkpoints) has no scale: inputs stay
    # unscaled, where 1 / clamp(0) used to scale every later input by 1e8.
    tr = SAETrainer(SAEConfig(16, 64, 4), TrainConfig(total_tokens=400, batch_size=40))
    tr.initialise(torch.zeros_like(raw_x))
    assert float(tr.sae.input_scale) == 1.0 and math.isfinite(tr.step(raw_x[:40])["loss"])


def test_step_logs_and_decoder_unit_norm(make_trainer):
    tr = make_trainer(steps=3)
    logs = tr.step(torch.randn(128, 16) * 5 + 2)
    assert set(logs) == {"loss", "mse", "aux", "fvu", "l0", "dead_fraction", "lr"}
    assert logs["l0"] <= 4 and 0 < logs["fvu"] < 2
    torch.testing.assert_close(tr.sae.W_dec.norm(dim=1), torch.ones(64))
    ev = tr.evaluate(torch.randn(300, 16) * 5 + 2)
    assert {"fvu", "explained_variance", "cosine", "l0", "dead_fraction", "density"} <= set(ev)
    assert ev["explained_variance"] == pytest.approx(1 - ev["fvu"])


def test_auxk_uses_only_dead_latents_and_agrees_about_b_dec(trained, raw_x):
    tr, sae = trained, trained.sae
    tr.since_fired[:] = 0
    assert tr.step(raw_x)["aux"] == 0.0  # nothing dead, no auxiliary loss
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:5] = True
    out = sae(raw_x, dead, tr.k_aux)
    with torch.no_grad():  # dense reference: top min(k_aux, 5) ReLU'd dead pre-activations, decoded without b_dec
        pre = sae.pre_acts(raw_x)
        acts = torch.zeros_like(pre)
        top = pre[:, :5].topk(min(tr.k_aux, 5), dim=-1)
        acts[:, :5] = acts[:, :5].scatter(1, top.indices, top.values.relu())
        e_hat = acts @ sae.W_dec
        torch.testing.assert_close(out.aux_recon, e_hat, atol=1e-5, rtol=1e-5)
        e = out.x - out.recon  # b_dec cancels in the residual, and e_hat carries none either
        expected = ((e - e_hat) ** 2).sum(-1).mean() / ((e - e.mean(0)) ** 2).sum(-1).mean() * min(5 / tr.k_aux, 1)
    aux = (e - out.aux_recon).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean() * min(5 / tr.k_aux, 1)
    sae.zero_grad()
    aux.backward()  # AuxK moves only the dead latents' decoder rows and encoder columns (and no bias of live ones)
    assert sae.W_dec.grad[5:].abs().max() == 0 and sae.W_dec.grad[:5].abs().max() > 0
    assert sae.W_enc.grad[:, 5:].abs().max() == 0 and sae.b_enc.grad[5:].abs().max() == 0
    tr.since_fired[:] = 0
    tr.since_fired[:5] = tr.dead_tokens
    logs = tr.step(raw_x)
    assert logs["aux"] == pytest.approx(float(expected), rel=1e-4)
    assert logs["dead_fraction"] == 5 / 64


def test_dead_counter_counts_tokens_since_firing(trained, raw_x):
    tr = trained
    tr.since_fired[:] = 7
    out_idx = tr.sae(raw_x).indices
    tr.step(raw_x)
    fired = torch.zeros(64, dtype=torch.bool)
    fired[out_idx.flatten()] = True
    assert (tr.since_fired[~fired] == 7 + 40).all()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_state_dict_round_trip_continues_identically(make_trainer, arch, tmp_path):
    from dlmscope.runstate import load_state, save_state

    a = make_trainer(arch, steps=5)
    a.since_fired[:3] = a.dead_tokens  # some dead latents, so AuxK is part of the continuation
    snap = a.state_dict()
    save_state(tmp_path, "trainer", snap)  # train-sae's resume path: safetensors + JSON, no pickle
    xs = [torch.randn(128, 16, generator=torch.Generator().manual_seed(i)) * 5 + 2 for i in range(3)]
    logs_a = [a.step(x) for x in xs]
    assert not torch.equal(snap["sae"]["W_enc"], a.sae.W_enc.detach())  # the snapshot did not move
    b = SAETrainer(a.sae.cfg, a.cfg)
    b.load_state_dict(load_state(tmp_path, "trainer"))
    logs_b = [b.step(x) for x in xs]
    assert logs_a == logs_b
    for (name, p), q in zip(a.sae.state_dict().items(), b.sae.state_dict().values()):
        assert torch.equal(p, q), name
    assert torch.equal(a.since_fired, b.since_fired) and a.step_count == b.step_count
    sa, sb = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(sa[i].keys() == sb[i].keys() for i in sa)
    assert all(torch.equal(v, sb[i][n]) if torch.is_tensor(v) else v == sb[i][n] for i in sa for n, v in sa[i].items())


def test_learns_a_known_sparse_dictionary():
    gen = torch.Generator().manual_seed(1)
    D = torch.nn.functional.normalize(torch.randn(128, 32, generator=gen), dim=1)

    def batch():
        idx = torch.randint(0, 128, (512, 3), generator=gen)
        return torch.nn.functional.embedding_bag(idx, D, per_sample_weights=torch.rand(512, 3, generator=gen) + 0.5,
                                                 mode="sum")

    tr = SAETrainer(SAEConfig(32, 256, 4),
                    TrainConfig(total_tokens=300 * 512, batch_size=512, lr=1e-2, warmup_steps=10))
    first = tr.step(batch())["fvu"]
    for _ in range(299):
        tr.step(batch())
    ev = tr.evaluate(batch())
    assert first > 0.5 and ev["fvu"] < 0.15
    cos = torch.nn.functional.normalize(tr.sae.W_dec.detach(), dim=1) @ D.t()
    assert float((cos.max(0).values > 0.9).float().mean()) > 0.9  # the true atoms are recovered


def test_bf16_autocast_step_runs():
    tr = SAETrainer(SAEConfig(16, 64, 4), TrainConfig(total_tokens=256, batch_size=128, autocast_bf16=True))
    tr.since_fired[:4] = tr.dead_tokens
    logs = tr.step(torch.randn(128, 16))
    assert math.isfinite(logs["loss"]) and logs["aux"] > 0
    assert tr.sae.W_enc.dtype == torch.float32


def test_bf16_autocast_auxk_routes_agree_beyond_bfloat16_integers(monkeypatch):
    """Under bfloat16 autocast, tokens with more positive dead activations than bfloat16 counts exactly (256; here
    about 600, different per token, and all of them kept: k_aux exceeds the dead latents): the ragged route's token
    offsets must match its entries, so both AuxK routes decode the same prediction."""
    from dlmscope.sae import SAE, model

    sae = SAE(SAEConfig(8, 1200, 4), seed=0)
    dead = torch.ones(1200, dtype=torch.bool)
    dead[:8] = False
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.copy_(-sae.pre_acts(x).median(0).values)  # about half of each token's pre-activations positive
    recon = {}
    for route in ("ragged", "dense"):
        monkeypatch.setattr(model, "_dense_aux", lambda *shape, r=route: r == "dense")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x, dead, 5000)
        recon[route] = out.aux_recon.float()
    with torch.no_grad():
        counts = (sae.pre_acts(x)[:, dead] > 0).sum(1)
    assert counts.min() > 300 and len(set(counts.tolist())) > 8
    scale = recon["dense"].abs().max()
    assert (recon["ragged"] - recon["dense"]).abs().max() < 0.005 * scale  # bfloat16 rounding; offsets off by 1-2: 0.01


def test_nan_activations_stop_the_step_with_auxk_on(monkeypatch):
    """A NaN input reaches AuxK's counts as NaN; the step still ends in NonFiniteError (the run keeps its last good
    checkpoint), not in an error from the ragged route's offsets."""
    from dlmscope.sae import model
    from dlmscope.sae.train import NonFiniteError

    monkeypatch.setattr(model, "_dense_aux", lambda *shape: False)
    tr = SAETrainer(SAEConfig(16, 64, 4), TrainConfig(total_tokens=256, batch_size=32, optimizer="adam"))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    tr.step(x)
    tr.since_fired[::2] = tr.dead_tokens
    x[3, 5] = float("nan")
    with pytest.raises(NonFiniteError):
        tr.step(x)


def test_check_finite_names_nan_and_inf_and_passes_sums_that_overflow(make_trainer):
    from dlmscope.sae.train import NonFiniteError

    tr = make_trainer()
    loss = torch.tensor(1.0)
    with torch.no_grad():
        tr.sae.W_dec.fill_(3e38)  # finite, but its sum is inf: the element-wise check clears it
    tr.check_finite(loss)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with torch.no_grad():
            tr.sae.W_dec[1, 2] = bad
        with pytest.raises(NonFiniteError, match="non-finite weight .*W_dec"):
            tr.check_finite(loss)
        with torch.no_grad():
            tr.sae.W_dec[1, 2] = 0.0
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        tr.check_finite(torch.tensor(float("inf")))
