"""bench_sae_steps.py's paired whole-run timing, run for real at a tiny shape (random activations)."""

import torch


def test_every_step_is_timed_for_both_optimisers_with_phases_and_the_floor(load_benchmark):
    bench = load_benchmark("bench_sae_steps")
    x = torch.randn(64 * 24, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    r = bench.run(x, batch=64, latents=128, k=4)
    assert r["steps"] == 24 and [rec["step"] for rec in r["records"]] == list(range(24))
    for rec in r["records"]:
        assert rec["floor_s"] >= 0
        for o in bench.OPTIMISERS:
            phases = sum(rec[o][f"{p}_s"] for p in bench.PHASES)
            assert abs(phases - rec[o]["step_s"]) < 1e-9 and rec[o]["forward_s"] > 0  # the phases add up
            assert 0 <= rec[o]["dead_fraction"] <= 1 and rec[o]["fvu"] > 0
            aux = rec[o]["aux"]  # AuxK's block, on the steps with dead latents
            assert (aux is None) == (rec[o]["dead_fraction"] == 0)
            assert aux is None or (0 <= aux["positive"] <= 1 and aux["route"] in ("dense", "ragged", "none positive"))
    s = bench.report(r["records"])
    assert {"whole run", "quarter 1", "quarter 4"} <= set(s)
    whole = s["whole run"]
    assert whole["signum_sf_over_adam"]["n"] == 24
    lo, hi = whole["signum_sf_over_adam"]["ci95"]
    assert lo <= whole["signum_sf_over_adam"]["median"] <= hi
    assert set(whole["adam_ms"]) == {"step", *bench.PHASES}
    ran = [rec["signum_sf"]["aux"] for rec in r["records"] if rec["signum_sf"]["aux"]]
    assert ran, "the tiny run leaves latents dead, so AuxK runs"
    assert whole["signum_sf_aux"]["steps"] == len(ran)
    assert whole["signum_sf_aux"]["dense_share"] == sum(a["route"] == "dense" for a in ran) / len(ran)


def test_median_interval_is_order_statistics(load_benchmark):
    bench = load_benchmark("bench_sae_steps")
    assert bench.median_ci(list(range(101))) == [40, 61]  # ranks 50.5 -+ 1.96 * sqrt(101) / 2, rounded outwards


def test_aux_coefficient_and_dead_window_reach_both_trainers(load_benchmark):
    bench = load_benchmark("bench_sae_steps")
    timed = {o: bench.Timed(o, 16, 128, 4, 64 * 4, 64, aux_coef=0.0, dead_tokens=200) for o in bench.OPTIMISERS}
    assert all(t.tr.cfg.aux_coef == 0.0 and t.tr.dead_tokens == 200 for t in timed.values())
