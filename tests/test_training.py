import json
import os
import subprocess
import sys

import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.cli import main
from dlmscope.sae import load_sae
from dlmscope.training import TrainSAEConfig, train_sae


def _cfg(tiny_dirs, tmp_path, **kw):
    base = dict(model=str(tiny_dirs["llada"]), layers="0,1", k="4,8", expansion=4, total_tokens=256 * 12,
                batch_size=256, buffer_tokens=1024, seqs_per_forward=8, context_length=32, eval_tokens=256,
                eval_every=4, checkpoint_every=4, out=str(tmp_path), name="run", progress=False)
    base.update(kw)
    return TrainSAEConfig(**base)


def test_end_to_end_four_saes(tiny_dirs, tmp_path):
    result = train_sae(_cfg(tiny_dirs, tmp_path))
    assert len(result.saes) == 4
    for key, folder in result.saes.items():
        sae = load_sae(folder)
        assert sae.cfg.metadata["masking_policy"] == "mask" and sae.cfg.metadata["t_range"] == [0.05, 0.5]
        assert result.metrics[key]["fvu"] < 1.5
    assert (result.folder / "report.html").is_file()
    metrics = json.loads((result.folder / "metrics.json").read_text())
    assert metrics["history"][-1]["step"] == 12


def test_resume_equals_uninterrupted(tiny_dirs, tmp_path):
    full = train_sae(_cfg(tiny_dirs, tmp_path / "a"))
    # An interrupted run: stop after 5 steps (SIGINT path), then resume.
    import dlmscope.training as training

    cfg = _cfg(tiny_dirs, tmp_path / "b")
    original = training.SAETrainer.step
    calls = {"n": 0}

    def interrupting(self, x, reduce=None):
        calls["n"] += 1
        if calls["n"] == 4 * 5:  # 4 SAEs per step: the 5th step
            os.kill(os.getpid(), 2)
        return original(self, x, reduce)

    training.SAETrainer.step = interrupting
    try:
        part = train_sae(cfg)
    finally:
        training.SAETrainer.step = original
    assert part.interrupted
    cfg.resume = True
    resumed = train_sae(cfg)
    for key in full.saes:
        a, b = load_sae(full.saes[key]), load_sae(resumed.saes[key])
        torch.testing.assert_close(a.W_enc, b.W_enc, atol=1e-5, rtol=1e-4)


def test_cli_train_sae_and_bad_inputs(tiny_dirs, tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"model: {tiny_dirs['llada']}\nlayers: '1'\nk: '4'\nexpansion: 2\ntotal_tokens: 1024\n"
                        f"batch_size: 256\nbuffer_tokens: 1024\nseqs_per_forward: 8\ncontext_length: 32\neval_tokens: 128\n")
    main(["train-sae", "--config", str(cfg_file), "--out", str(tmp_path), "--name", "cli", "--no-progress"])
    assert "FVU" in capsys.readouterr().out
    for args, message in ((["--layers", "9"], "out of range"), (["--k", "500"], "0 < k < n_latents"),
                          (["--out", "/proc/nope"], "cannot write to output folder"),
                          (["--dataset", str(tmp_path / "none.txt")], "does not exist")):
        with pytest.raises(SystemExit) as e:
            main(["train-sae", "--config", str(cfg_file), "--out", str(tmp_path), "--name", "x", "--no-progress", *args])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_two_process_gloo_matches_single_process(tiny_dirs, tmp_path):
    common = ["--model", str(tiny_dirs["llada"]), "--layers", "1", "--k", "4", "--expansion", "2",
              "--total-tokens", "2048", "--batch-size", "256", "--buffer-tokens", "1024", "--seqs-per-forward", "4",
              "--context-length", "32", "--eval-tokens", "256", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dlmscope",
                    "train-sae", *common, "--out", str(tmp_path), "--name", "ddp"], check=True, env=env,
                   capture_output=True, timeout=300)
    main(["train-sae", *common, "--out", str(tmp_path), "--name", "single"])
    a = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["final"]
    b = json.loads((tmp_path / "single" / "metrics.json").read_text())["final"]
    key = next(iter(a))
    assert abs(a[key]["fvu"] - b[key]["fvu"]) < 0.1
