"""The GPU suite's code path, run for real on CPU at a tiny shape (`--tiny`)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_suite_writes_every_measurement(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--tiny", "--repeats", "1",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert r["tiny"] and r["device"] == "cpu" and "all 4 layers" in r["model"]
    c = r["capture"]
    assert c["hooks"] == [f"blocks.{i}.hook_resid_post" for i in range(4)] and c["tokens_per_forward"] == 64
    assert c["bare_s"] > 0 and c["capture_s"] > 0 and c["peak_gib_bare"] is None  # no GPU memory on CPU
    s = r["sae"]
    assert (s["d_in"], s["latents"], s["k"], s["batch"], s["steps"]) == (64, 256, 8, 64, 4)
    assert s["dlmscope"]["tokens_per_s"] > 0 and s["floor"]["step_over_floor"] > 0
    assert s["dlmscope signum_sf"]["tokens_per_s"] > 0 and s["floor_signum_sf"]["step_over_floor"] > 0
    if importlib.util.find_spec("sparsify") is not None:
        assert s["sparsify"]["tokens_per_s"] > 0 and s["dlmscope_over_sparsify"] > 0
        assert s["dlmscope_signum_sf_over_sparsify"] > 0
    else:
        assert s["sparsify"].startswith("skipped")
    g = r["sampler"]
    assert g["no cache"]["steps_per_s"] > 0 and (g["gen_length"], g["steps"]) == (16, 4)
    assert g["prefix cache"]["steps_per_s"] > 0 and g["dual cache"]["steps_per_s"] > 0
    table = (tmp_path / "gpu.md").read_text()
    assert "| capture of 4 layers |" in table and "x the floor" in table and "| sampler, 16 tokens" in table
    assert "| the same with `--optimizer signum_sf` |" in table
