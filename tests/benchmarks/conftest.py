"""Benchmark scripts are files, not a package: the tests load them by name, with their folder importable as when
one runs (a script imports its siblings by name)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture
def load_benchmark():
    """load_benchmark("bench_sae_steps") -> that script as a fresh module."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture
def tiny_grid_study(load_benchmark, monkeypatch):
    """tiny_grid_study("bench_signum_dead") -> (that study, its `bench_sae_grid`), shrunk for a test: 96 latents,
    k 4, 128 held-out vectors (the studies on the grid's data read LATENTS, K and grid.HELDOUT)."""
    def load(name: str):
        module = load_benchmark(name)
        monkeypatch.setattr(module, "LATENTS", 96)
        monkeypatch.setattr(module, "K", 4)
        import bench_sae_grid as grid  # the copy the study imports
        monkeypatch.setattr(grid, "HELDOUT", 128)
        return module, grid
    return load
