import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.analysis.diffing import decoder_stats
from dlmscope.sae import TrainConfig
from dlmscope.sae.crosscoder import (CrossCoder, CrossCoderConfig, CrossCoderTrainer, load_crosscoder,
                                     save_crosscoder)

D, N_SHARED, N_EXTRA = 16, 16, 4


def _directions():
    gen = torch.Generator().manual_seed(0)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, D, generator=gen), dim=1)  # noqa: E731
    return unit(N_SHARED), unit(N_EXTRA)


def _paired(n: int, planted: bool, seed: int) -> torch.Tensor:
    """Sparse codes over shared directions in both checkpoints; with `planted`, checkpoint B also has 4 extra
    directions of its own."""
    shared, extra = _directions()
    gen = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, N_SHARED, generator=gen) < 0.08) * (0.5 + torch.rand(n, N_SHARED, generator=gen))
    b = (torch.rand(n, N_EXTRA, generator=gen) < 0.08) * (0.5 + torch.rand(n, N_EXTRA, generator=gen))
    xa = a @ shared
    xb = xa + b @ extra if planted else xa.clone()
    return torch.cat([xa, xb], dim=1)


def _train(planted: bool, steps: int = 400, init: str = "shared") -> CrossCoderTrainer:
    x = _paired(steps * 256, planted, seed=1)
    tr = CrossCoderTrainer(CrossCoderConfig(D, 64, 3, ["a", "b"], {"hook_name": "h"}, init),
                           TrainConfig(total_tokens=steps * 256, batch_size=256, lr=3e-3, seed=0))
    for i in range(steps):
        tr.step(x[i * 256:(i + 1) * 256])
    return tr


@pytest.fixture(scope="module")
def planted():
    return _train(planted=True)


def _alive_relative_norm(tr: CrossCoderTrainer, planted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ev = tr.evaluate(_paired(4000, planted, seed=2))
    assert ev["fvu"] < 0.15
    alive = ev["density"] > 0
    return decoder_stats(tr.sae)["relative_norm"][:, 0], alive


def test_planted_directions_are_recovered_as_specific(planted):
    rel, alive = _alive_relative_norm(planted, planted=True)
    specific = (alive & (rel > 0.9)).nonzero().flatten()
    assert 1 <= len(specific) <= 8
    assert not bool((alive & (rel < 0.1)).any())  # nothing is specific to A
    _, extra = _directions()
    cc = planted.sae
    dirs = torch.nn.functional.normalize(cc.W_dec[1, specific].detach(), dim=1)
    cos = dirs @ extra.t()  # (specific, planted)
    assert bool((cos.max(0).values > 0.9).all()), cos  # every planted direction has a B-only latent
    assert bool((cos.max(1).values > 0.9).all()), cos  # and every B-only latent is a planted direction


def test_identical_checkpoints_give_no_specific_latents():
    tr = _train(planted=False, steps=200)
    rel, alive = _alive_relative_norm(tr, planted=False)
    assert int(alive.sum()) >= N_SHARED // 2
    assert not bool((alive & ((rel > 0.9) | (rel < 0.1))).any()), rel[alive]
    # Latents start shared and identical checkpoints get identical updates: the decoders never part.
    assert torch.allclose(tr.sae.W_dec[0], tr.sae.W_dec[1]) and rel.sub(0.5).abs().max() < 1e-5


def test_independent_init_starts_apart_and_still_finds_the_planted_directions():
    shared, independent = (CrossCoder(CrossCoderConfig(D, 64, 3, ["a", "b"], decoder_init=i)) for i in
                           ("shared", "independent"))
    assert torch.equal(shared.W_dec[0], shared.W_dec[1])
    start = torch.nn.functional.cosine_similarity(independent.W_dec[0], independent.W_dec[1], dim=1)
    assert start.abs().max() < 0.9 and decoder_stats(independent)["relative_norm"].sub(0.5).abs().max() < 1e-6
    tr = _train(planted=True, init="independent")
    rel, alive = _alive_relative_norm(tr, planted=True)
    specific = (alive & (rel > 0.9)).nonzero().flatten()
    _, extra = _directions()
    cos = torch.nn.functional.normalize(tr.sae.W_dec[1, specific].detach(), dim=1) @ extra.t()
    assert bool((cos.max(0).values > 0.9).all()), cos  # every planted direction has a B-only latent
    assert not bool((alive & (rel < 0.1)).any())


def test_independent_init_on_identical_checkpoints_converges_without_specific_latents():
    tr = _train(planted=False, steps=200, init="independent")
    start = CrossCoder(CrossCoderConfig(D, 64, 3, ["a", "b"], decoder_init="independent"))
    start_median = float(torch.nn.functional.cosine_similarity(start.W_dec[0], start.W_dec[1], dim=1).abs().median().detach())
    rel, alive = _alive_relative_norm(tr, planted=False)
    assert not bool((alive & ((rel > 0.9) | (rel < 0.1))).any()), rel[alive]
    cos = torch.nn.functional.cosine_similarity(tr.sae.W_dec[0], tr.sae.W_dec[1], dim=1)[alive]
    assert cos.median() > 0.5 > start_median  # the two decoders of a used latent move together from independent starts
    assert rel[alive].sub(0.5).abs().max() > 1e-4  # but not exactly: the spread a null test reads


def test_decoder_init_is_checked_and_saved(tmp_path):
    with pytest.raises(DLMScopeError, match="decoder_init='both'; allowed: shared, independent"):
        CrossCoderConfig(D, 64, 3, ["a", "b"], decoder_init="both")
    cc = CrossCoder(CrossCoderConfig(D, 64, 3, ["a", "b"], decoder_init="independent"))
    assert load_crosscoder(save_crosscoder(cc, tmp_path / "cc")).cfg.decoder_init == "independent"


def test_save_load_round_trip_is_exact(planted, tmp_path):
    cc = planted.sae
    density = torch.rand(64)
    folder = save_crosscoder(cc, tmp_path / "cc", density=density)
    back = load_crosscoder(folder)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "input_scale", "threshold"):
        assert torch.equal(getattr(back, name), getattr(cc, name)), name
    assert back.cfg == cc.cfg
    x = _paired(64, True, seed=3)
    assert torch.equal(back.reconstruct(x), cc.reconstruct(x))
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(folder / "crosscoder.safetensors"))["density"], density)
    raw = bytearray((folder / "crosscoder.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (folder / "crosscoder.safetensors").write_bytes(bytes(raw))
    with pytest.raises(DLMScopeError, match="checksum"):
        load_crosscoder(folder)
    with pytest.raises(DLMScopeError, match="not a crosscoder folder"):
        load_crosscoder(tmp_path)


def test_trainer_resume_continues_bit_for_bit(tmp_path):
    from dlmscope.runstate import load_state, save_state

    x = _paired(256 * 8, True, seed=4)
    cfg = CrossCoderConfig(D, 64, 3, ["a", "b"])
    tcfg = TrainConfig(total_tokens=256 * 8, batch_size=256, seed=0, dead_tokens=256)

    def run(tr, steps):
        for i in steps:
            tr.step(x[i * 256:(i + 1) * 256])
        return tr

    full = run(CrossCoderTrainer(cfg, tcfg), range(8))
    half = run(CrossCoderTrainer(cfg, tcfg), range(4))
    save_state(tmp_path, "s", {"t": half.state_dict()})
    resumed = CrossCoderTrainer(cfg, tcfg)
    resumed.load_state_dict(load_state(tmp_path, "s")["t"])
    run(resumed, range(4, 8))
    for name, p in full.sae.state_dict().items():
        assert torch.equal(p, resumed.sae.state_dict()[name]), name


def test_bad_shapes_are_one_line():
    with pytest.raises(DLMScopeError, match="at least two checkpoints"):
        CrossCoderConfig(D, 64, 3, ["only"])
    cc = CrossCoder(CrossCoderConfig(D, 64, 3, ["a", "b"]))
    with pytest.raises(DLMScopeError, match=r"width 16 but the crosscoder expects 2 checkpoints x d_in 16 = 32"):
        cc.encode(torch.zeros(2, D))


def test_trainer_refuses_a_target_before_any_update():
    """The trainer keeps SAETrainer's signature (a transcoder's `target`); a crosscoder has none to learn."""
    tr = CrossCoderTrainer(CrossCoderConfig(D, 64, 3, ["a", "b"], {"hook_name": "h"}),
                           TrainConfig(total_tokens=256, batch_size=256, seed=0))
    x = _paired(256, planted=False, seed=3)
    before = {k: v.clone() for k, v in tr.sae.state_dict().items()}
    with pytest.raises(DLMScopeError, match="takes no target"):
        tr.step(x, target=x)
    assert tr.step_count == 0 and not tr.initialised
    assert all(torch.equal(before[k], v) for k, v in tr.sae.state_dict().items())


def test_resample_reinitialises_dead_latents_from_high_error_tokens():
    x = _paired(512, planted=True, seed=3)
    tr = CrossCoderTrainer(CrossCoderConfig(D, 64, 3, ["a", "b"], decoder_init="independent"),
                           TrainConfig(total_tokens=256 * 8, batch_size=256, lr=3e-3, dead_tokens=256))
    for i in range(2):
        tr.step(x[i * 256:(i + 1) * 256])
    dead = (tr.since_fired >= tr.dead_tokens).nonzero().flatten()
    alive = (tr.since_fired < tr.dead_tokens).nonzero().flatten()
    assert 0 < len(dead) < 64
    cc, before = tr.sae, tr.sae.W_dec.detach().clone()
    err = torch.zeros(256, 2 * D)
    err[7] = torch.randn(2 * D)  # one token carries all the error: every dead latent is drawn from it
    assert tr.resample(x[:256], err) == len(dead)
    want = torch.nn.functional.normalize(err[7], dim=0).view(2, D)
    rows = cc.W_dec.detach()[:, dead]  # (C, m, d)
    per_latent = torch.nn.functional.normalize(rows.transpose(0, 1).flatten(1), dim=1)  # (m, C * d)
    torch.testing.assert_close(per_latent, want.flatten().expand(len(dead), -1))
    assert torch.equal(cc.W_dec.detach()[:, alive], before[:, alive])  # alive latents untouched
    assert bool((cc.b_enc.detach()[dead] == 0).all()) and bool((tr.since_fired[dead] == 0).all())
    state = tr.opt.state[cc.W_dec]
    assert bool((state["exp_avg"][:, dead] == 0).all()) and bool((state["exp_avg_sq"][:, dead] == 0).all())


def test_step_resamples_only_on_its_schedule_in_the_first_half():
    x = _paired(256 * 8, planted=False, seed=4)
    tr = CrossCoderTrainer(CrossCoderConfig(D, 64, 3, ["a", "b"]),
                           TrainConfig(total_tokens=256 * 8, batch_size=256, lr=3e-3, dead_tokens=256),
                           resample_every=2)
    got = [tr.step(x[i * 256:(i + 1) * 256])["resampled"] for i in range(8)]
    assert got[1] > 0 and got[0] == got[2] == got[4] == got[5] == got[6] == got[7] == 0  # steps 2 and 4 only
    with pytest.raises(DLMScopeError, match="resample_every"):
        CrossCoderTrainer(CrossCoderConfig(D, 64, 3, ["a", "b"]), TrainConfig(total_tokens=256, batch_size=256),
                          resample_every=-1)
