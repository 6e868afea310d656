"""bench_signum_dead.py run for real at a tiny shape: every probe trains, the step correction is exact, rendered."""

import torch


def test_rescaled_sign_steps_equal_steps_of_that_size(tiny_grid_study):
    """Scaling a latent's step by s after the fact gives what a step of s * lr would have given that latent."""
    bench, grid = tiny_grid_study("bench_signum_dead")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    runs = [grid.Ours("signum_sf", 16, 96, 4, 64 * 4, 64, 0) for _ in range(2)]
    for r in runs:
        r.tr.step(x)  # first step: schedule state exists
    scale = torch.ones(96)
    scale[:10] = 0.0  # these latents take no sign step
    before = {n: p.detach().clone() for n, p in runs[0].tr.sae.named_parameters()}
    z_before = runs[0].tr.opt.state[runs[0].tr.sae.b_enc]["z"].clone()
    step = runs[0].tr.opt.step
    runs[0].tr.opt.step = lambda closure=None: (step(), bench.rescale_sign_steps(runs[0].tr, scale))
    runs[0].tr.step(x)
    runs[1].tr.step(x)
    after, plain = dict(runs[0].tr.sae.named_parameters()), dict(runs[1].tr.sae.named_parameters())
    opt = runs[0].tr.opt
    b_enc = runs[0].tr.sae.b_enc
    c = opt.param_groups[0]["lr"] ** 2 / opt.state[b_enc]["weight_sum"]
    # latents 0-9 took only the step's interpolation towards z, and z itself did not move
    torch.testing.assert_close(after["b_enc"][:10], before["b_enc"][:10] + c * (z_before[:10] - before["b_enc"][:10]))
    torch.testing.assert_close(opt.state[b_enc]["z"][:10], z_before[:10])
    assert not torch.equal(plain["b_enc"][:10], after["b_enc"][:10])
    torch.testing.assert_close(after["b_enc"][10:], plain["b_enc"][10:])
    torch.testing.assert_close(after["W_enc"][:, 10:], plain["W_enc"][:, 10:])


def test_every_probe_trains_and_pairs_with_the_default(tiny_grid_study):
    bench, grid = tiny_grid_study("bench_signum_dead")
    x = torch.randn(64 * 8 + 128, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    rows = {}
    for seed in (0, 1):
        for name in bench.PROBES:
            rows[f"64/{name}/{seed}"] = r = bench.train(grid, x, name, 64, 64 * 8, seed)
            assert 0 < r["fvu"] < 2 and 0 <= r["dead_mean"] <= 1 and 0 <= r["never_fired"] <= 1
    assert len({rows[f"64/{n}/0"]["fvu"] for n in bench.PROBES}) > 1  # the probes change training
    summary = bench.summarise(grid, rows)
    assert [c["probe"] for c in summary] == list(bench.PROBES) and summary[0]["fvu_vs_default"][0] == 0.0
    table = bench.readme_table({"summary": summary})
    assert table.count("\n") == 7 and "| 64 | dead steps x3 | 2 |" in table
