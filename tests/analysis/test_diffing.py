import json
import os
import signal

import pytest
import torch

from dlmscope.analysis.diffing import decoder_stats, latent_scaling, relative_norm_test, scaling_ratios
from dlmscope.errors import DLMScopeError
from dlmscope.cli import main
from dlmscope.sae.crosscoder import CrossCoder, CrossCoderConfig, load_crosscoder

pytestmark = pytest.mark.usefixtures("one_thread")

E = torch.eye(4)


def _hand_built(dec_a: list, dec_b: list, enc: list) -> CrossCoder:
    """A 2-checkpoint, 4-d crosscoder with given decoder rows per latent and encoder columns (8-d reads)."""
    cc = CrossCoder(CrossCoderConfig(4, len(enc), 1, ["A", "B"]))
    with torch.no_grad():
        cc.W_dec.copy_(torch.stack([torch.stack(dec_a), torch.stack(dec_b)]))
        cc.W_enc.copy_(torch.stack(enc, dim=1))
        cc.b_enc.zero_()
        cc.b_dec.zero_()
        cc.threshold.fill_(0.0)
    return cc


def _data(base_e0: float, n: int = 500):
    """Latent 0's concept e0 at strength f in B and base_e0 * f in A; a shared concept e1 (strength g) in both."""
    gen = torch.Generator().manual_seed(0)
    f, g = torch.rand(n, 1, generator=gen) + 0.1, torch.rand(n, 1, generator=gen) + 0.1
    return torch.cat([base_e0 * f * E[0] + g * E[1], f * E[0] + g * E[1]], dim=1)


def _nu(cc, x):
    latents, source = torch.tensor([0]), torch.tensor([1])
    betas = latent_scaling(cc, x, latents, source)
    return betas, {k: float(v[0]) for k, v in scaling_ratios(betas, source, torch.tensor([0])).items()}


Z = torch.zeros(4)
SHARED_ENC = torch.cat([E[1], E[1]]) / 2  # latent 1 reads e1 from both halves


def test_latent_scaling_genuinely_specific():
    cc = _hand_built([Z, E[1]], [E[0], E[1]], [torch.cat([Z, E[0]]), SHARED_ENC])
    betas, nu = _nu(cc, _data(0.0))
    assert betas["activation"][0].tolist() == pytest.approx([0.0, 1.0], abs=1e-5)
    assert nu["nu_error"] == pytest.approx(0.0, abs=1e-5) and nu["nu_reconstruction"] == pytest.approx(0.0, abs=1e-5)


def test_latent_scaling_flags_complete_shrinkage():
    """A's decoder for the latent is zero although A carries half of the concept: it sits in A's error."""
    cc = _hand_built([Z, E[1]], [E[0], E[1]], [torch.cat([Z, E[0]]), SHARED_ENC])
    betas, nu = _nu(cc, _data(0.5))
    assert betas["activation"][0].tolist() == pytest.approx([0.5, 1.0], abs=1e-5)
    assert betas["error"][0].tolist() == pytest.approx([0.5, 1.0], abs=1e-5)
    assert nu["nu_error"] == pytest.approx(0.5, abs=1e-5) and nu["nu_reconstruction"] == pytest.approx(0.0, abs=1e-5)


def test_latent_scaling_flags_latent_decoupling():
    """The concept is in both checkpoints, but latent 2 reconstructs it in A while latent 0 does so in B."""
    cc = _hand_built([Z, E[1], E[0]], [E[0], E[1], Z], [torch.cat([Z, E[0]]), SHARED_ENC, torch.cat([E[0], Z])])
    betas, nu = _nu(cc, _data(1.0))
    assert betas["reconstruction"][0].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert nu["nu_reconstruction"] == pytest.approx(1.0, abs=1e-5) and nu["nu_error"] == pytest.approx(0.0, abs=1e-5)


def test_latent_scaling_targets_match_least_squares_with_decoder_bias():
    """Each beta is the least-squares scale of f_j d against the upstream targets, built here by hand: activation
    minus bias, the full reconstruction (decoder bias included) and the error without latent j's own row."""
    gen = torch.Generator().manual_seed(3)
    cc = CrossCoder(CrossCoderConfig(4, 6, 3, ["A", "B"]))
    with torch.no_grad():
        for p in (cc.W_enc, cc.W_dec, cc.b_dec):
            p.copy_(torch.randn(p.shape, generator=gen))
        cc.b_enc.fill_(0.5)
        cc.input_scale.copy_(torch.tensor([0.5, 2.0]))
        cc.threshold.fill_(0.0)
    x = torch.randn(300, 8, generator=gen)
    latents, source = torch.tensor([0, 2, 5]), torch.tensor([1, 0, 1])
    betas = latent_scaling(cc, x, latents, source, batch_size=64)
    with torch.no_grad():
        f = cc.encode(x)
        xs = cc.split(x) * cc.input_scale[:, None]
        recon = cc.split(cc.decode_scaled(f))
    for i, (j, s) in enumerate(zip(latents.tolist(), source.tolist())):
        fd = (f[:, j, None] * cc.W_dec[s, j]).detach().flatten()[:, None]  # (N * d, 1)
        for c in range(2):
            targets = {"activation": xs[:, c] - cc.b_dec[c], "reconstruction": recon[:, c],
                       "error": xs[:, c] - recon[:, c] + f[:, j, None] * cc.W_dec[c, j]}
            for name, y in targets.items():
                want = torch.linalg.lstsq(fd.double(), y.detach().flatten()[:, None].double()).solution.item()
                assert betas[name][i, c].item() == pytest.approx(want, rel=1e-4, abs=1e-6), (name, j, c)


def test_decoder_stats_relative_norm_and_cosine():
    cc = _hand_built([Z, E[1], 3 * E[2]], [E[0], E[1], -E[2]], [SHARED_ENC] * 3)
    s = decoder_stats(cc)
    assert s["relative_norm"][:, 0].tolist() == pytest.approx([1.0, 0.5, 0.25])
    assert s["cosine"][1:, 0].tolist() == pytest.approx([1.0, -1.0])


def test_relative_norm_test_separates_a_wider_spread_from_the_null():
    gen = torch.Generator().manual_seed(0)
    null = 0.5 + 0.01 * torch.randn(600, generator=gen)
    same = relative_norm_test(0.5 + 0.01 * torch.randn(600, generator=gen), null, n_permutations=500)
    wide = relative_norm_test(0.5 + 0.03 * torch.randn(600, generator=gen), null, n_permutations=500)
    assert same["ks_pvalue"] > 0.05 and same["spread_pvalue"] > 0.05
    assert wide["ks_pvalue"] < 1e-6 and wide["spread_pvalue"] == 1 / 501  # no permutation reaches the observed spread
    assert wide["spread"] > 2 * wide["spread_null"] and wide["n"] == wide["n_null"] == 600
    # one latent moved to r = 1 (a single planted feature) does not move the distribution: the count rule's job
    one = relative_norm_test(torch.cat([null[:-1], torch.ones(1)]), null, n_permutations=500)
    assert one["ks_pvalue"] > 0.5
    with pytest.raises(DLMScopeError, match="at least 2 latents per side; got 1 and 600"):
        relative_norm_test(torch.ones(1), null)


# ------------------------------------------------------------------------------- dlmscope diff end to end

@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from dlmscope.data import builtin_corpus

    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(builtin_corpus("train")[:150]))
    return path


def _args(tiny_dirs, text, out, *extra):
    return ["diff", "--checkpoints", f"{tiny_dirs['llada']},{tiny_dirs['llada']}", "--dataset", str(text),
            "--layers", "1", "--k", "4", "--expansion", "4", "--total-tokens", str(256 * 8), "--batch-size", "256",
            "--buffer-tokens", "1024", "--seqs-per-forward", "8", "--context-length", "32", "--eval-tokens", "256",
            "--eval-every", "4", "--checkpoint-every", "4", "--n-seqs", "4", "--out", str(out), "--name", "d",
            "--no-progress", *extra]


def test_diff_identical_checkpoints_end_to_end(tiny_dirs, text, tmp_path, capsys):
    main(_args(tiny_dirs, text, tmp_path, "--diff-sae"))
    out = capsys.readouterr().out
    assert "0 specific to it" in out and "diff-SAE" in out
    report = json.loads((tmp_path / "d" / "diff.json").read_text())
    cc = report["crosscoders"]["blocks.1.hook_resid_post-k4"]
    e = cc["per_checkpoint"][0]
    assert e["specific_later"]["count"] == 0 and e["specific_base"]["count"] == 0 and cc["n_alive"] > 0
    assert report["diff_saes"]["blocks.1.hook_resid_post-k4-diffsae"]["relative_difference_norm_sq"] == 0.0
    assert (tmp_path / "d" / "diff.html").stat().st_size > 1000
    loaded = load_crosscoder(cc["folder"])
    assert loaded.cfg.checkpoints == [str(tiny_dirs["llada"])] * 2 and loaded.cfg.hook_name == "blocks.1.hook_resid_post"


def test_diff_null_control_and_decoder_init_from_the_cli(tiny_dirs, text, tmp_path, capsys):
    main(_args(tiny_dirs, text, tmp_path, "--null-control", "--decoder-init", "independent"))
    out = capsys.readouterr().out
    assert "against base vs base: KS D" in out and "permutation p" in out
    report = json.loads((tmp_path / "d" / "diff.json").read_text())
    test = report["crosscoders"]["blocks.1.hook_resid_post-k4"]["per_checkpoint"][0]["null_test"]
    null = report["null_crosscoders"]["blocks.1.hook_resid_post-k4-null"]
    assert test["n_null"] == null["n_alive"] > 0 and 0 < test["spread_pvalue"] <= 1 and 0 <= test["ks_pvalue"] <= 1
    assert load_crosscoder(report["crosscoders"]["blocks.1.hook_resid_post-k4"]["folder"]).cfg.decoder_init == \
        "independent"
    # shared starts: identical checkpoints keep identical decoders, relative norms exactly 0.5 (the exact check)
    args = _args(tiny_dirs, text, tmp_path, "--decoder-init", "shared")
    args[args.index("--name") + 1] = "s"
    main(args)
    shared = json.loads((tmp_path / "s" / "diff.json").read_text())["crosscoders"]["blocks.1.hook_resid_post-k4"]
    assert set(shared["per_checkpoint"][0]["relative_norm"]) == {0.5} and "null_test" not in shared["per_checkpoint"][0]


def test_diff_resume_equals_uninterrupted(tiny_dirs, text, tmp_path):
    import dlmscope.sae.crosscoder as crosscoder
    from dlmscope.training import DiffConfig, DiffRun

    def cfg(name, **kw):
        return DiffConfig(checkpoints=f"{tiny_dirs['llada']},{tiny_dirs['llada']}", dataset=str(text), layers="1",
                          k="4", expansion=4, total_tokens=256 * 8, batch_size=256, buffer_tokens=1024,
                          seqs_per_forward=8, context_length=32, eval_tokens=256, eval_every=4, checkpoint_every=4,
                          out=str(tmp_path), name=name, progress=False, **kw)

    full = DiffRun(cfg("full")).run()
    original, calls = crosscoder.CrossCoderTrainer.step, {"n": 0}

    def interrupting(self, x, reduce=None):
        calls["n"] += 1
        if calls["n"] == 6:  # a SIGINT during step 6, after the checkpoint at step 4
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, x, reduce)

    crosscoder.CrossCoderTrainer.step = interrupting
    try:
        part = DiffRun(cfg("part")).run()
    finally:
        crosscoder.CrossCoderTrainer.step = original
    assert part.interrupted
    resumed = DiffRun(cfg("part", resume=True)).run()
    a, b = (load_crosscoder(r.saes["blocks.1.hook_resid_post-k4"]) for r in (full, resumed))
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "input_scale", "threshold"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_diff_bad_inputs_are_one_line(tiny_dirs, text, tmp_path, tokenizer, capsys):
    from dlmscope.models.tiny import write_tiny_llada
    from dlmscope.tokenizer import train_tokenizer
    from dlmscope.data import builtin_corpus

    narrow = write_tiny_llada(tmp_path / "narrow", mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                              tokenizer=tokenizer, d_model=32)
    other_tok = train_tokenizer(builtin_corpus("train")[500:900], vocab_size=len(tokenizer))
    retok = write_tiny_llada(tmp_path / "retok", mask_id=other_tok.mask_token_id, vocab_size=len(other_tok),
                             tokenizer=other_tok)
    base = _args(tiny_dirs, text, tmp_path)
    for checkpoints, message in ((str(tiny_dirs["llada"]), "at least two comma-separated checkpoints"),
                                 (f"{tiny_dirs['llada']},{narrow}", "differ in architecture"),
                                 (f"{tiny_dirs['llada']},{retok}", "different tokenizers")):
        args = list(base)
        args[2] = checkpoints
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
