"""bench_sae_revision.py: an earlier revision's trainer extracted beside this one and paired step by step."""

import shutil

import pytest
import torch

from tests.benchmarks.conftest import ROOT


def test_the_same_code_as_base_is_bit_identical_at_every_step(load_benchmark, tmp_path):
    """With this checkout's own package as the base, the two trainers must agree bit for bit at every step (what a
    pure speed change must also show), and every step is timed."""
    bench = load_benchmark("bench_sae_revision")
    base = bench.extract_base(str(ROOT), tmp_path)
    assert base.__name__ == "dlmscope_base.sae" and base.SAETrainer.__module__.startswith("dlmscope_base.")
    x = torch.randn(64 * 12, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    r = bench.run(base, x, batch=64, latents=128, k=4, optimizer="signum_sf")
    assert r["steps"] == 12 and len(r["ratios"]) == 12 and all(v > 0 for v in r["ratios"])
    assert r["first_difference"] is None
    s = bench.report(r["ratios"])
    assert s["whole run"]["n"] == 12 and s["whole run"]["ci95"][0] <= s["whole run"]["median"]


def test_a_changed_trainer_is_caught(load_benchmark, tmp_path):
    """A base whose AuxK coefficient differs in the last bit of the default is not bit-identical: the check can fail."""
    bench = load_benchmark("bench_sae_revision")
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "dlmscope", copy / "dlmscope", ignore=shutil.ignore_patterns("__pycache__"))
    train = copy / "dlmscope" / "sae" / "train.py"
    text = train.read_text()
    assert "aux_coef: float = 1 / 32\n" in text
    train.write_text(text.replace("aux_coef: float = 1 / 32\n", "aux_coef: float = 1 / 32 * (1 + 2**-20)\n"))
    base = bench.extract_base(str(copy), tmp_path / "extracted")
    x = torch.randn(64 * 12, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    assert bench.run(base, x, batch=64, latents=128, k=4, optimizer="adam")["first_difference"] is not None


def test_a_git_revision_is_extracted(load_benchmark, tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs this repository's git history")
    bench = load_benchmark("bench_sae_revision")
    assert hasattr(bench.extract_base("HEAD", tmp_path), "SAETrainer")
    with pytest.raises(SystemExit, match="--base 'no-such-rev'"):
        bench.extract_base("no-such-rev", tmp_path / "bad")
