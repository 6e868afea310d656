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
from dlmscope.runstate import load_state
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
    return train_sae(_cfg(tiny_dirs, text, tmp_path_factory.mktemp("full"), threads=1))


def test_end_to_end_four_saes(full_run):
    assert len(full_run.saes) == 4 and not full_run.interrupted
    for key, folder in full_run.saes.items():
        sae = load_sae(folder)
        assert sae.cfg.metadata["masking_policy"] == "mask" and sae.cfg.metadata["t_range"] == [0.05, 0.5]
        assert sae.cfg.metadata["hook_name"] == key.rsplit("-k", 1)[0] and sae.cfg.k == int(key.rsplit("-k", 1)[1])
        assert sae.cfg.n_latents == 4 * 64
        assert full_run.metrics[key]["fvu"] < 1.0 and full_run.metrics[key]["l0"] <= sae.cfg.k
    folder = full_run.folder
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "metrics.json", "report.html", "checkpoint.json"} <= names
    assert not any(n.endswith((".tmp", ".pt", ".lock")) for n in names)
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
    assert part.signal == signal.SIGINT and load_state(part.folder, "checkpoint")["step"] == 6
    with pytest.raises(DLMScopeError, match="already exists; pass --resume"):
        train_sae(cfg)
    cfg.resume = True
    with pytest.raises(DLMScopeError, match=r"changed options \['k'\]"):
        train_sae(_cfg(tiny_dirs, text, tmp_path, k="4,16", resume=True))
    cfg.prefetch = False  # the first part made activations in a background thread, the rest does not
    resumed = train_sae(cfg)
    for key in full_run.saes:
        a, b = load_sae(full_run.saes[key]), load_sae(resumed.saes[key])
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (key, name)
    drop = ("seconds",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed.history] == \
        [{k: v for k, v in h.items() if k not in drop} for h in full_run.history]
    data = next(resumed.folder.glob("checkpoint.*.safetensors"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit in a weight
    data.write_bytes(bytes(raw))
    with pytest.raises(DLMScopeError, match=r"is corrupt \(checksum mismatch\)"):
        train_sae(cfg)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this creates a file: stands for arbitrary code
        return open, (str(self.marker), "w")


def test_resume_never_unpickles(tiny_dirs, text, tmp_path):
    import pickle

    folder, marker = tmp_path / "shared", tmp_path / "pwned"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(pickle.dumps({"step": 1, "x": _Payload(marker)}))
    with pytest.raises(DLMScopeError, match="checkpoint.json' does not exist .*not loaded: they are pickles"):
        train_sae(_cfg(tiny_dirs, text, tmp_path, name="shared", resume=True))
    assert not marker.exists() and (folder / "checkpoint.pt").exists()


def test_train_from_cache(llada, tiny_dirs, text, tmp_path):
    from dlmscope.activations import ActivationSource, write_cache
    from dlmscope.data import load_texts, pack

    rows = pack(llada.tokenizer, load_texts(str(text)), 32)
    src = ActivationSource(llada, ["blocks.1.hook_resid_post"], rows.input_ids, rows.doc_ids, seqs_per_batch=8)
    write_cache(src, tmp_path / "cache", n_batches=6, progress=False)
    result = train_sae(_cfg(tiny_dirs, text, tmp_path, activation_cache=str(tmp_path / "cache"), layers="1", k="4",
                            total_tokens=256 * 4))
    sae = load_sae(next(iter(result.saes.values())))
    assert sae.cfg.metadata["model_name"] == llada.name and sae.cfg.metadata["masking_policy"] == "mask"
    with pytest.raises(DLMScopeError, match="lacks hooks"):
        train_sae(_cfg(tiny_dirs, text, tmp_path, activation_cache=str(tmp_path / "cache"), layers="0", name="x"))
    shard = tmp_path / "cache" / "shard-00002.safetensors"
    shard.write_bytes(b"garbage" + shard.read_bytes()[7:])
    with pytest.raises(DLMScopeError, match="missing or corrupt"):
        train_sae(_cfg(tiny_dirs, text, tmp_path, activation_cache=str(tmp_path / "cache"), layers="1", name="y"))


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
    for args, message in ((["--layers", "9"], "out of range"), (["--site", "attn"], "'attn' is not one of 'pre', 'mid', 'post'"),
                          (["--k", "500"], "0 < k < n_latents"), (["--layers", "x"], "comma-separated integers"),
                          (["--optimizer", "sgd"], "'sgd' is not one of 'adam', 'signum_sf'"),
                          (["--out", "/proc/nope"], "cannot write to output folder"),
                          (["--dataset", str(tmp_path / "none.txt")], "does not exist"),
                          (["--dataset", str(empty)], "no non-empty texts"),
                          (["--dataset", str(short)], "fewer than one row"),
                          (["--activation-cache", str(tmp_path)], "not an activation cache"),
                          (["--name", "cli"], "already exists; pass --resume"),
                          (["--name", "../../escape"], "is not a name"),
                          (["--name", "ghost", "--resume"], "checkpoint.json' does not exist"),
                          (["--name", "cli", "--resume", "--k", "16"], "changed options"),
                          (["--config", str(tmp_path / "c.json")], "unknown config keys ['bogus']"),
                          (["--config", str(tmp_path / "nope.yaml")], "does not exist")):
        with pytest.raises(SystemExit) as e:
            main([*base, "--name", "bad", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert _digest(tmp_path / "cli") == done  # nothing already saved was touched
    assert not (tmp_path / "bad").exists() and not (tmp_path / "ghost").exists()  # failed runs leave no folder
    assert not (tmp_path.parent.parent / "escape").exists()
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
    for flag in ("--config", "--layers", "--k", "--policy", "--t-min", "--activation-cache", "--resume", "--sae-devices",
                 "--threads", "--total-tokens"):
        assert flag in out
    assert "Highest mask ratio" in out


def test_two_process_gloo_run_writes_once(tiny_dirs, text, tmp_path):
    """The real torchrun launch of train-sae: both ranks finish the same steps and only rank 0 writes.
    (Each rank draws its own data, so the result is compared with a single process below, on fixed batches.)"""
    common = ["--model", str(tiny_dirs["llada"]), "--dataset", str(text), "--layers", "1", "--k", "4",
              "--expansion", "2", "--total-tokens", "4096", "--batch-size", "256", "--buffer-tokens", "1024",
              "--seqs-per-forward", "4", "--context-length", "32", "--eval-tokens", "512", "--no-progress",
              "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                          "dlmscope", "train-sae", *common, "--name", "ddp"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    a = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    key = next(iter(a["final"]))
    assert a["steps"] == 16 and a["final"][key]["fvu"] < 1.0
    assert not (tmp_path / "ddp" / "saes" / key.replace(".", "_") / "rank1").exists()


def _wait_for(done, proc, seconds=120):
    """Wait until `done()` holds (a real run reached that point); fail if the run ended first."""
    import time

    for _ in range(seconds * 20):
        if done():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run never got there")


def test_concurrent_runs_kill_9_and_sigterm(tiny_dirs, text, tmp_path):
    """Real processes: a second run of the same name is refused while the first is alive; kill -9 leaves a
    stale lock and temporaries that the resume takes over and removes; SIGTERM checkpoints and exits 143."""
    args = [sys.executable, "-m", "dlmscope", "train-sae", "--model", str(tiny_dirs["llada"]), "--dataset", str(text),
            "--layers", "1", "--k", "4", "--expansion", "2", "--total-tokens", str(256 * 100_000), "--batch-size", "256",
            "--buffer-tokens", "1024", "--seqs-per-forward", "8", "--context-length", "32", "--eval-tokens", "256",
            "--eval-every", "1000", "--checkpoint-every", "3", "--threads", "1", "--no-progress", "--out", str(tmp_path),
            "--name", "dup"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    state = tmp_path / "dup" / "checkpoint.json"
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(state.exists, first)
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and f"in use by another process (pid {first.pid})" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()  # kill -9: no checkpoint, no cleanup
        first.communicate()
    leftover = tmp_path / "dup" / ".checkpoint.0123456789abcdef.safetensors.x1y2z3.tmp"
    leftover.write_bytes(b"\0" * (1 << 20))
    step_at_kill = load_state(tmp_path / "dup", "checkpoint")["step"]
    killed = state.stat().st_ino
    third = subprocess.Popen([*args, "--resume"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: state.stat().st_ino != killed, third)  # the resumed run's own checkpoint
        third.send_signal(signal.SIGTERM)
        out, err = third.communicate(timeout=300)
    finally:
        third.kill()
    assert third.returncode == 143, err
    assert "interrupted at step" in out
    assert not leftover.exists() and not (tmp_path / "dup" / ".lock").exists()
    assert load_state(tmp_path / "dup", "checkpoint")["step"] > step_at_kill


DATA_PARALLEL_WORKER = """
import sys, torch
from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig
from dlmscope.training import _Dist



class NoGradAllReduce(SAETrainer):
    # The control: every other reduction (scale, b_dec, dead counters, AuxK variance) stays; the gradients are
    # not averaged over processes.
    def backward(self, loss, reduce):
        return super().backward(loss, None)


torch.set_num_threads(1)
dist = _Dist("cpu")  # what train_sae uses: torch.distributed under torchrun, a no-op alone
g = torch.Generator().manual_seed(0)
batches = [torch.randn(64, 16, generator=g) * torch.linspace(0.5, 2, 16) + 1 for _ in range(12)]
out = {}
for name, dead_tokens, trainer in (("no_aux", 10**9, SAETrainer), ("aux", None, SAETrainer),
                                   ("no_grad_all_reduce", 10**9, NoGradAllReduce)):
    tr = trainer(SAEConfig(16, 64, 4, "topk", {}),
                 TrainConfig(total_tokens=64 * 12, batch_size=64, b_dec_init="mean", dead_tokens=dead_tokens))
    share = 64 // dist.world  # this rank's slice of every global batch
    logs = [tr.step(x[dist.rank * share:(dist.rank + 1) * share], dist.mean if dist.world > 1 else None)
            for x in batches]
    out[name] = tr.sae.state_dict()
    out[name + ".dead"] = max(log["dead_fraction"] for log in logs)
if dist.main:
    torch.save(out, sys.argv[1])
print(f"rank {dist.rank}: trained", file=sys.stderr, flush=True)
dist.close()
print(f"rank {dist.rank}: closed", file=sys.stderr, flush=True)
"""
# gloo can abort a rank in its C++ teardown under heavy CPU load ("terminate called without an active
# exception", SIGABRT; seen 3 times this round, always in a full suite on a loaded 2-core machine, never in
# 9 standalone runs). The run is retried on that message only, at most twice; the markers above say how far
# the aborted rank got.
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


@pytest.fixture(scope="module")
def data_parallel_weights(tmp_path_factory):
    """SAE weights after 12 steps on the same global batches: 2 gloo processes (each half of every batch)
    and 1 process (whole batches)."""
    folder = tmp_path_factory.mktemp("dp")
    (folder / "worker.py").write_text(DATA_PARALLEL_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    for cmd, out in ((torchrun, "two.pt"),
                     ([sys.executable], "one.pt")):
        for _ in range(3):
            run = subprocess.run([*cmd, str(folder / "worker.py"), str(folder / out)], env=env, capture_output=True,
                                 text=True, timeout=300)
            if run.returncode == 0 or GLOO_TEARDOWN_ABORT not in run.stderr:
                break
            print("gloo teardown abort, retrying:", [ln for ln in run.stderr.splitlines() if ln.startswith("rank ")])
        assert run.returncode == 0, run.stderr[:2000] + "\n...\n" + run.stderr[-2000:]
    return torch.load(folder / "two.pt"), torch.load(folder / "one.pt")


def test_two_processes_train_the_same_sae_as_one(data_parallel_weights):
    """Gradients averaged over processes == the gradient of the whole batch, so the weights agree to float
    round-off (1.2e-7 measured). The control run drops only the gradient all-reduce (rank 0 steps on its own
    half-batch gradient): its weights must miss the single-process ones by far more than the tolerance, so the
    tolerance would catch a missing all-reduce."""
    two, one = data_parallel_weights
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "input_scale"):
        torch.testing.assert_close(two["no_aux"][name], one["no_aux"][name], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for name in ("W_enc", "W_dec", "b_enc"):
        missed = (two["no_grad_all_reduce"][name] - one["no_aux"][name]).abs().max()
        assert missed > 100 * (1e-6 + 1e-5 * one["no_aux"][name].abs().max()), (name, float(missed))


def test_two_processes_match_one_with_dead_latents(data_parallel_weights):
    """Dead latents (AuxK) too: the dead counter advances by the global batch and AuxK normalises by the global
    residual variance (before the fix each rank counted its own tokens and these weights differed)."""
    two, one = data_parallel_weights
    assert two["no_aux.dead"] == one["no_aux.dead"] == 0 and two["aux.dead"] == one["aux.dead"] > 0
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(two["aux"][name], one["aux"][name], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("family", ["lladamoe", "llada2"])
def test_train_sae_on_moe_residual_streams(family, tokenizer, text, tmp_path):
    from dlmscope.models.tiny import write_tiny_llada2, write_tiny_lladamoe

    write = {"lladamoe": write_tiny_lladamoe, "llada2": write_tiny_llada2}[family]
    folder = write(tmp_path / family, vocab_size=len(tokenizer), tokenizer=tokenizer, mask_id=tokenizer.mask_token_id)
    result = train_sae(TrainSAEConfig(model=str(folder), dataset=str(text), layers="1", k="4", expansion=2,
                                      total_tokens=256 * 4, batch_size=256, buffer_tokens=512, seqs_per_forward=4,
                                      context_length=32, eval_tokens=128, eval_every=2, checkpoint_every=4,
                                      out=str(tmp_path / "runs"), name="moe", progress=False))
    (key, metrics), = result.metrics.items()
    assert "blocks.1.hook_resid_post" in key and 0 < metrics["fvu"] < 2 and metrics["l0"] <= 4
    # eval-splice on the same model (block models read each block given clean earlier blocks)
    from dlmscope.analysis.splice import SpliceConfig, splice_eval
    from dlmscope.models import load_model
    from dlmscope.sae import load_sae

    lm = load_model(folder)
    rows = torch.randint(0, len(tokenizer), (4, 16))
    res = splice_eval(lm, load_sae(result.saes[key]), rows, SpliceConfig(t_bins=(0.3,), n_seqs=4, batch_size=4),
                      other_model_ok=True)
    clean, spliced = res["bins"]["0.3"]["clean"]["ce"][0], res["bins"]["0.3"]["sae"]["ce"][0]
    assert 0 < clean < 20 and 0 < spliced < 20 and clean != spliced


def test_signum_sf_run_saves_the_averaged_weights(tiny_dirs, text, tmp_path):
    from dlmscope.training import SAERun

    run = SAERun(_cfg(tiny_dirs, text, tmp_path, layers="1", k="4", optimizer="signum_sf", prefetch=False))
    result = run.run()
    tr = next(iter(run.trainers.values()))
    saved = load_sae(next(iter(result.saes.values())))
    with tr.averaged():
        w_dec = tr.sae.W_dec.detach() / tr.sae.input_scale  # the saved SAE has the input scale folded in
    assert torch.allclose(saved.W_dec, w_dec, atol=1e-6) and not torch.allclose(saved.W_dec, tr.sae.W_dec.detach()
                                                                                   / tr.sae.input_scale, atol=1e-6)
    assert json.loads((result.folder / "config.json").read_text())["optimizer"] == "signum_sf"
    assert result.metrics[next(iter(result.saes))]["fvu"] < 1.0


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


@pytest.fixture
def nan_cache(llada, text, tmp_path):
    """A cache of 8 shards (7 training, 1 held out); `damage(i, value)` writes `value` into shard i's activations
    and re-records its checksum, as a bug upstream of the cache would (the file is intact, the numbers are not)."""
    from safetensors.torch import load_file, save_file

    from dlmscope.activations import ActivationSource, write_cache
    from dlmscope.data import load_texts, pack
    from dlmscope.io_utils import file_sha256

    rows = pack(llada.tokenizer, load_texts(str(text)), 32)
    src = ActivationSource(llada, ["blocks.1.hook_resid_post"], rows.input_ids, rows.doc_ids, seqs_per_batch=8,
                           policy="all")  # 256 tokens a shard: shard i enters the 2-shard buffer at step ~i
    folder = write_cache(src, tmp_path / "cache", n_batches=8, progress=False)

    def damage(i: int, value: float):
        manifest = json.loads((folder / "manifest.json").read_text())
        shard = folder / manifest["shards"][i]["file"]
        tensors = load_file(str(shard))
        tensors["act.blocks.1.hook_resid_post"][::2] = value
        save_file(tensors, str(shard))
        manifest["shards"][i]["sha256"] = file_sha256(shard)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return shard

    return folder, damage


def _cli_fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    err = out.err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, (out.out, err)
    return err


def _cache_run(folder, out, *extra):
    return ["train-sae", "--activation-cache", str(folder), "--layers", "1", "--k", "4", "--expansion", "2", "--batch-size", "256",
            "--buffer-tokens", "512", "--total-tokens", str(256 * 6), "--eval-tokens", "256", "--threads", "1",
            "--no-progress", "--out", str(out), "--name", "run", *extra]


def test_nan_in_a_checksummed_cache_shard_stops_in_one_line(nan_cache, tmp_path, capsys):
    folder, damage = nan_cache
    shard = damage(1, float("nan"))
    err = _cli_fails(_cache_run(folder, tmp_path / "runs"), capsys)
    assert f"cache shard {str(shard)!r} is unusable" in err and "NaN/inf" in err
    assert not (tmp_path / "runs" / "run" / "saes").exists()


def test_divergence_keeps_the_last_good_checkpoint_and_saves_nothing(nan_cache, tmp_path, capsys):
    """Finite but huge activations late in the stream overflow the loss after checkpoints were written: the run
    stops naming the step and the kept checkpoint, which still loads, finite; no SAE is written."""
    folder, damage = nan_cache
    damage(3, 1e30)
    err = _cli_fails(_cache_run(folder, tmp_path / "runs", "--checkpoint-every", "1"), capsys)
    assert "training stopped: blocks.1.hook_resid_post-k4: non-finite" in err
    assert "the last good checkpoint (step" in err
    step = int(err.split("the last good checkpoint (step ")[1].split(")")[0])
    state = load_state(tmp_path / "runs" / "run", "checkpoint")
    assert state["step"] == step >= 1 and not (tmp_path / "runs" / "run" / "saes").exists()
    assert all(torch.isfinite(t).all() for t in state["trainers"]["blocks.1.hook_resid_post-k4"]["sae"].values())


def test_resume_state_holding_nan_is_refused_before_loading(nan_cache, tmp_path, capsys):
    from dlmscope.runstate import save_state

    folder, _ = nan_cache
    main(_cache_run(folder, tmp_path / "runs"))
    capsys.readouterr()
    run = tmp_path / "runs" / "run"
    state = load_state(run, "checkpoint")
    state["trainers"]["blocks.1.hook_resid_post-k4"]["sae"]["W_enc"][0, 0] = float("nan")
    save_state(run, "checkpoint", state)  # valid checksums around a NaN
    err = _cli_fails(_cache_run(folder, tmp_path / "runs", "--resume"), capsys)
    assert "resume state" in err and "is unusable: tensor trainers.blocks.1.hook_resid_post-k4.sae.W_enc (1 of" in err


@pytest.mark.parametrize("argv,message", [
    (["--architecture", "jumprelu", "--l0-coef", "nan"], "--l0-coef=nan must be a finite number"),
    (["--architecture", "jumprelu", "--bandwidth", "0"], "bandwidth=0.0 must be a finite number in (0, inf)"),
    (["--total-tokens", "100000000000000000000000"], "--total-tokens=100000000000000000000000 is out of range"),
    (["--seed", "100000000000000000000000"], "--seed=100000000000000000000000 is out of range"),
])
def test_train_sae_bad_numbers_before_anything_runs(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert message in _cli_fails(["train-sae", *argv], capsys)
    assert not any(tmp_path.iterdir())


def test_save_functions_refuse_non_finite(tiny_sae, tmp_path):
    from dlmscope.sae import save_sae
    from dlmscope.sae.crosscoder import CrossCoder, CrossCoderConfig, save_crosscoder

    broken = load_sae(save_sae(tiny_sae, tmp_path / "ok"))
    with torch.no_grad():
        broken.W_dec[3, 1] = float("inf")
    with pytest.raises(DLMScopeError, match=r"refusing to save the SAE .*tensor W_dec \(1 of"):
        save_sae(broken, tmp_path / "bad")
    cc = CrossCoder(CrossCoderConfig(8, 16, 2, ["a", "b"]))
    with torch.no_grad():
        cc.W_enc.fill_(float("nan"))
    with pytest.raises(DLMScopeError, match="refusing to save the crosscoder"):
        save_crosscoder(cc, tmp_path / "cc")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "cc").exists()
