import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.cli import main
from dlmscope.sae import load_sae
from dlmscope.training import TrainSAEConfig, train_sae


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A small blank-line separated text file: packing it is fast, unlike the whole built-in corpus."""
    from dlmscope.data import builtin_corpus

    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(builtin_corpus("train")[:150]))
    return path


def _cfg(tiny_dirs, text, out, **kw):
    base = dict(model=str(tiny_dirs["llada"]), dataset=str(text), layers="0,1", k="4,8", expansion=4,
                total_tokens=256 * 12, batch_size=256, buffer_tokens=1024, seqs_per_forward=8, context_length=32,
                eval_tokens=256, eval_every=4, checkpoint_every=4, out=str(out), name="run", progress=False)
    base.update(kw)
    return TrainSAEConfig(**base)


@pytest.fixture(scope="module")
def full_run(tiny_dirs, text, tmp_path_factory):
    torch.set_num_threads(1)
    return train_sae(_cfg(tiny_dirs, text, tmp_path_factory.mktemp("full")))


def test_end_to_end_four_saes(full_run):
    assert len(full_run.saes) == 4 and not full_run.interrupted
    for key, folder in full_run.saes.items():
        sae = load_sae(folder)
        assert sae.cfg.metadata["masking_policy"] == "mask" and sae.cfg.metadata["t_range"] == [0.05, 0.5]
        assert sae.cfg.metadata["hook_name"] == key.rsplit("-k", 1)[0] and sae.cfg.k == int(key.rsplit("-k", 1)[1])
        assert sae.cfg.n_latents == 4 * 64
        assert full_run.metrics[key]["fvu"] < 1.0 and full_run.metrics[key]["l0"] <= sae.cfg.k
    folder = full_run.folder
    assert {"config.json", "metrics.json", "report.html", "checkpoint.pt"} <= {p.name for p in folder.iterdir()}
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [4, 8, 12]
    final = metrics["final"]["blocks.1.hook_resid_post-k8"]
    assert {"fvu", "cosine", "l0", "dead_fraction", "explained_variance"} <= set(final)
    assert sum(final["density_histogram"]["counts"]) > 0
    assert json.loads((folder / "config.json").read_text())["k"] == "4,8"
    assert "plotly" in (folder / "report.html").read_text()[:100_000].lower()


def test_resume_equals_uninterrupted(full_run, tiny_dirs, text, tmp_path):
    import dlmscope.training as training

    cfg = _cfg(tiny_dirs, text, tmp_path)
    original = training.SAETrainer.step
    calls = {"n": 0}

    def interrupting(self, x, reduce=None):
        calls["n"] += 1
        if calls["n"] == 4 * 5 + 1:  # 4 SAEs per step: a SIGINT during step 6 (after the checkpoint at 4)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, x, reduce)

    training.SAETrainer.step = interrupting
    try:
        part = train_sae(cfg)
    finally:
        training.SAETrainer.step = original
    assert part.interrupted and not part.saes and not (part.folder / "saes").exists()
    assert torch.load(part.folder / "checkpoint.pt", weights_only=False)["step"] == 6
    with pytest.raises(DLMScopeError, match="already exists; pass --resume"):
        train_sae(cfg)
    cfg.resume = True
    with pytest.raises(DLMScopeError, match=r"changed options \['k'\]"):
        train_sae(_cfg(tiny_dirs, text, tmp_path, k="4,16", resume=True))
    resumed = train_sae(cfg)
    for key in full_run.saes:
        a, b = load_sae(full_run.saes[key]), load_sae(resumed.saes[key])
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-4)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full_run.history]


def test_train_from_cache(llada, tiny_dirs, text, tmp_path):
    from dlmscope.activations import ActivationSource, write_cache
    from dlmscope.data import load_texts, pack

    rows = pack(llada.tokenizer, load_texts(str(text)), 32)
    src = ActivationSource(llada, ["blocks.1.hook_resid_post"], rows.input_ids, rows.doc_ids, seqs_per_batch=8)
    write_cache(src, tmp_path / "cache", n_batches=6, progress=False)
    result = train_sae(_cfg(tiny_dirs, text, tmp_path, cache=str(tmp_path / "cache"), layers="1", k="4",
                            total_tokens=256 * 4))
    sae = load_sae(next(iter(result.saes.values())))
    assert sae.cfg.metadata["model_name"] == llada.name and sae.cfg.metadata["masking_policy"] == "mask"
    with pytest.raises(DLMScopeError, match="lacks hooks"):
        train_sae(_cfg(tiny_dirs, text, tmp_path, cache=str(tmp_path / "cache"), layers="0", name="x"))
    shard = tmp_path / "cache" / "shard-00002.safetensors"
    shard.write_bytes(b"garbage" + shard.read_bytes()[7:])
    with pytest.raises(DLMScopeError, match="missing or corrupt"):
        train_sae(_cfg(tiny_dirs, text, tmp_path, cache=str(tmp_path / "cache"), layers="1", name="y"))


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_config_file_and_bad_inputs(tiny_dirs, text, tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"model: {tiny_dirs['llada']}\ndataset: {text}\nlayers: '1'\nk: '4'\nexpansion: 2\n"
                        "total_tokens: 1024\nbatch_size: 256\nbuffer_tokens: 1024\nseqs_per_forward: 8\n"
                        "context_length: 32\neval_tokens: 128\nthreads: 1\n")
    main(["train-sae", "--config", str(cfg_file), "--out", str(tmp_path), "--name", "cli", "--no-progress",
          "--k", "8"])  # a flag beats the config file
    out = capsys.readouterr().out
    assert "FVU" in out and "k8" in out
    done = _digest(tmp_path / "cli")
    (tmp_path / "c.json").write_text(json.dumps({"layers": "1", "bogus": 1}))
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("\n\n  \n")
    short.write_text("one tiny document\n\nand another")
    base = ["train-sae", "--config", str(cfg_file), "--out", str(tmp_path), "--no-progress"]
    for args, message in ((["--layers", "9"], "out of range"), (["--site", "attn"], "allowed: pre, mid, post"),
                          (["--k", "500"], "0 < k < n_latents"), (["--layers", "x"], "comma-separated integers"),
                          (["--out", "/proc/nope"], "cannot write to output folder"),
                          (["--dataset", str(tmp_path / "none.txt")], "does not exist"),
                          (["--dataset", str(empty)], "no non-empty texts"),
                          (["--dataset", str(short)], "fewer than one row"),
                          (["--cache", str(tmp_path)], "not an activation cache"),
                          (["--name", "cli"], "already exists; pass --resume"),
                          (["--name", "cli", "--resume", "--k", "16"], "changed options"),
                          (["--config", str(tmp_path / "c.json")], "unknown config keys ['bogus']"),
                          (["--config", str(tmp_path / "nope.yaml")], "does not exist")):
        with pytest.raises(SystemExit) as e:
            main([*base, "--name", "bad", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert _digest(tmp_path / "cli") == done  # nothing already saved was touched
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()
    # A damaged SAE file and activations of the wrong width: one line each.
    sae_dir = next((tmp_path / "cli" / "saes").iterdir())
    sae = load_sae(sae_dir)
    with pytest.raises(DLMScopeError, match="d_in=32 but the SAE expects d_in=64"):
        sae.encode(torch.zeros(3, 32))
    (sae_dir / "sae_weights.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(DLMScopeError, match="cannot read SAE weights"):
        load_sae(sae_dir)


def test_help_lists_every_option(capsys):
    try:
        main(["train-sae", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--layers", "--k", "--policy", "--t-min", "--cache", "--resume", "--sae-devices",
                 "--threads", "--total-tokens"):
        assert flag in out
    assert "Highest mask ratio" in out


def test_two_process_gloo_matches_single_process(tiny_dirs, text, tmp_path):
    common = ["--model", str(tiny_dirs["llada"]), "--dataset", str(text), "--layers", "1", "--k", "4",
              "--expansion", "2", "--total-tokens", "4096", "--batch-size", "256", "--buffer-tokens", "1024",
              "--seqs-per-forward", "4", "--context-length", "32", "--eval-tokens", "512", "--no-progress",
              "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dlmscope",
                          "train-sae", *common, "--name", "ddp"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    main(["train-sae", *common, "--name", "single", "--threads", "1"])
    a = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    b = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert a["steps"] == b["steps"] == 16
    key = next(iter(a["final"]))
    assert abs(a["final"][key]["fvu"] - b["final"][key]["fvu"]) < 0.05
    assert abs(a["final"][key]["cosine"] - b["final"][key]["cosine"]) < 0.05
    assert not (tmp_path / "ddp" / "saes" / key.replace(".", "_") / "rank1").exists()


@pytest.mark.parametrize("arch,extra", [("jumprelu", {}), ("matryoshka", {"prefix_sizes": "16,64"}),
                                        ("skip_transcoder", {"site": "mlp_in", "target_site": "mlp_out"})])
def test_train_sae_family_architectures(tiny_dirs, text, tmp_path, arch, extra):
    cfg = _cfg(tiny_dirs, text, tmp_path, layers="1", k="8", architecture=arch, total_tokens=256 * 4, eval_every=2,
               **extra)
    result = train_sae(cfg)
    (key, folder), = result.saes.items()
    sae = load_sae(folder)
    assert sae.cfg.architecture == arch and 0 < result.metrics[key]["fvu"] < 10 and result.metrics[key]["l0"] > 0
    if arch == "matryoshka":
        assert sae.cfg.prefix_sizes == (16, 64, 256)
    if arch == "skip_transcoder":
        assert key == "blocks.1.hook_mlp_in-k8" and sae.cfg.hook_name_out == "blocks.1.hook_mlp_out"


@pytest.mark.parametrize("extra,match", [({"architecture": "transcoder", "site": "mlp_in", "target_site": "mlp_in"},
                                          "target site other than"),
                                         ({"architecture": "transcoder"}, "target site other than"),
                                         ({"architecture": "matryoshka", "prefix_sizes": "64,16"}, "prefix sizes")])
def test_train_sae_family_bad_options_one_line(tiny_dirs, text, tmp_path, capsys, extra, match):
    args = ["train-sae", "--model", str(tiny_dirs["llada"]), "--dataset", str(text), "--layers", "1", "--out",
            str(tmp_path), "--total-tokens", "512", "--batch-size", "256", "--no-progress"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", v]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and match in err and "\n" not in err
