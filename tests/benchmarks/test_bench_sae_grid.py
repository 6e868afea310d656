"""bench_sae_grid.py run for real at a tiny shape: every cell and trainer recorded, the one-run claim exact, resume."""

import json

import pytest
import torch


def _bench(load_benchmark, monkeypatch):
    module = load_benchmark("bench_sae_grid")
    monkeypatch.setattr(module, "SHORT", 64 * 3)
    monkeypatch.setattr(module, "LONG", 64 * 7)
    monkeypatch.setattr(module, "HELDOUT", 128)
    monkeypatch.setattr(module, "SOURCES", {"tiny": {"latents": 96, "k": 4}})
    monkeypatch.setattr(module, "CHECK_UNIT", ("tiny", 64, 0))
    return module


def test_grid_unit_records_both_checkpoints_and_resumes(load_benchmark, monkeypatch):
    bench = _bench(load_benchmark, monkeypatch)
    x = torch.randn(64 * 7 + 128, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    rows, saves = {}, []
    bench.run_unit("tiny", 64, 0, x, rows, lambda: saves.append(len(rows)))
    runners = {(r["runner"], r["tokens"]) for r in rows.values()}
    assert runners == {("adam short", 192), ("adam", 448), ("signum_sf", 192), ("signum_sf", 448), ("sparsify", 192),
                       ("sparsify", 448), ("signum_sf check", 192), ("sparsify check", 192)}
    assert saves == list(range(1, 9))  # written after every evaluation
    assert all(0 < r["fvu"] < 2 and r["tokens_per_s"] > 0 and 0 <= r["never_fired"] < 1 for r in rows.values())
    # schedules that ignore the run's length: the long run's first checkpoint is the short run, exactly
    for t, c in bench.check(rows).items():
        assert c["difference"] == 0.0, t
    bench.run_unit("tiny", 64, 1, x, rows, lambda: None)
    del rows[bench.key("tiny", 64, 1, "sparsify", 448)]  # as if interrupted before sparsify's last evaluation
    kept = dict(rows)
    bench.run_unit("tiny", 64, 1, x, rows, lambda: None)  # reruns sparsify only
    assert set(rows) == set(kept) | {bench.key("tiny", 64, 1, "sparsify", 448)}
    assert all(rows[k] is kept[k] for k in kept)
    [short, long] = bench.summarise(rows)
    assert (short["tokens"], long["tokens"], short["seeds"]) == (192, 448, [0, 1])
    for c in (short, long):
        for t in bench.TRAINERS:
            mean, lo, hi = c[t]["fvu"]
            assert lo <= mean <= hi
        assert len(c["signum_sf_minus_sparsify_fvu"]) == 3 and c["signum_sf_over_sparsify_speed"][0] > 0
    extremes = bench.per_run(rows)
    assert extremes["runs"] == 4 and extremes["min_signum_sf_over_sparsify_speed"] > 0 and "seed" in extremes["at"]
    table = bench.readme_table({"summary": [short, long]})
    assert table.count("\n") == 3 and "| tiny | 64 | 448 | 2 |" in table and table.count("%") == 6


def test_never_fired_counts_latents_without_a_positive_top_k_activation(load_benchmark):
    bench = load_benchmark("bench_sae_grid")

    class Fixed:
        def encode_topk(self, x):
            return torch.tensor([[1.0, 0.0], [2.0, 0.5]]), torch.tensor([[0, 1], [0, 3]])

    assert bench.never_fired(Fixed(), None, 5) == pytest.approx(3 / 5)  # latent 1 selected only at zero; 2 and 4 never selected


def test_study_results_fill_only_missing_rows_and_save_after_each(load_benchmark, tmp_path):
    """A study killed after its first job resumes with the second: rows are saved as they finish."""
    grid = load_benchmark("bench_sae_grid")
    path = tmp_path / "study.json"
    ran = []

    def job(name: str, fail: bool = False) -> dict:
        ran.append(name)
        if fail:
            raise KeyboardInterrupt  # the study is killed during its second job
        return {"fvu": len(name)}

    results = grid.Results(path, lambda rows: {"summary": sorted(rows)})
    try:
        results.fill([("a", lambda: job("a")), ("bb", lambda: job("bb", fail=True))], lambda r: f"FVU {r['fvu']}")
    except KeyboardInterrupt:
        pass
    saved = json.loads(path.read_text())
    assert saved["rows"] == {"a": {"fvu": 1}} and saved["summary"] == ["a"]
    resumed = grid.Results(path, lambda rows: {"summary": sorted(rows)})
    resumed.fill([("a", lambda: job("a")), ("bb", lambda: job("bb"))], lambda r: f"FVU {r['fvu']}")
    assert ran == ["a", "bb", "bb"] and json.loads(path.read_text())["summary"] == ["a", "bb"]


def test_study_command_line_takes_its_flags_and_lists(load_benchmark, monkeypatch, tmp_path):
    grid = load_benchmark("bench_sae_grid")
    monkeypatch.setattr(grid, "activations", lambda source, n: torch.zeros(n, 4))
    monkeypatch.setattr("sys.argv", ["study", "--seeds", "3", "--tokens", "100,200", "--out", str(tmp_path / "s.json")])
    threads = torch.get_num_threads()
    try:
        args, x, results = grid.open_study("Doc line.\n\nMore.", "unused.json", lambda rows: ["rows", len(rows)],
                                           tokens="1,2")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert grid.ints(args.seeds) == [3] and grid.ints(args.batches) == [1024, 4096]
    assert grid.ints(args.tokens) == [100, 200] and x.shape == (grid.LONG + grid.HELDOUT, 4)
    results.save()
    assert json.loads((tmp_path / "s.json").read_text())["summary"] == ["rows", 0]
