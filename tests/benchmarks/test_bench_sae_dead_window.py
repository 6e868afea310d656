"""bench_sae_dead_window.py run for real at a tiny shape: both windows trained, paired by seed, rendered."""

import torch


def test_both_windows_train_and_pair_by_seed(tiny_grid_study):
    bench, grid = tiny_grid_study("bench_sae_dead_window")
    x = torch.randn(64 * 12 + 128, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    rows = {}
    for seed in (0, 1):
        for window in bench.WINDOWS:
            rows[f"signum_sf/64/768/{window}/{seed}"] = r = bench.train(grid, x, "signum_sf", 64, 64 * 12, window, seed)
            assert r["dead_tokens"] == 768 // bench.WINDOWS[window] and 0 < r["fvu"] < 2 and r["cpu_s"] > 0
            assert 0 <= r["dead_mean"] <= 1
    (cell,) = bench.summarise(grid, rows)
    assert cell["seeds"] == [0, 1] and cell["tokens"] == 768
    diffs = [rows[f"signum_sf/64/768/half run/{s}"]["fvu"] - rows[f"signum_sf/64/768/default/{s}"]["fvu"]
             for s in (0, 1)]
    assert abs(cell["fvu_difference"][0] - sum(diffs) / 2) < 1e-12
    table = bench.readme_table({"summary": [cell]})
    assert table.count("\n") == 2 and "| signum_sf | 64 | 768 | 2 |" in table
