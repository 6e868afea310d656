import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.models import load_model
from dlmscope.rl import RLConfig, sample_groups, train_rl
from dlmscope.rl.trainer import _grpo_update, _rspo_update


def _spy(lm, seen: list):
    inner = lm.denoise_logits

    def spy(ids, attention_mask=None):
        seen.extend(tuple(r) for r in ids.tolist())
        return inner(ids, attention_mask)

    lm.denoise_logits = spy


@pytest.mark.parametrize("update", [_rspo_update, _grpo_update])
def test_policy_and_reference_see_the_same_masks(tiny_dirs, count_task, update):
    policy, ref = load_model(tiny_dirs["llada"]), load_model(tiny_dirs["llada"])
    cfg = RLConfig(mc_draws=2, grad_accum=2, inner_iters=2, prompts_per_step=2, group_size=2)
    roll = sample_groups(policy, count_task, count_task.examples("train", 2), 2, gen_length=8, steps=4,
                         temperature=1.0, seed=0)
    seen_p, seen_r = [], []
    _spy(policy, seen_p)
    _spy(ref, seen_r)
    stats = update(policy, ref, roll, torch.optim.SGD(policy.module.parameters(), lr=0.0), cfg,
                   torch.Generator().manual_seed(0))
    assert set(seen_p) == set(seen_r) and len(set(seen_r)) > 4  # 2 draws or iterations x 4 rows (k may repeat)
    assert stats["log_ratio"] == pytest.approx(0.0, abs=1e-5)  # identical weights (lr 0): zero log-ratio


def test_rspo_raises_reward_checkpoints_reload_and_resume(tiny_dirs, count_task, tmp_path):
    kw = dict(model=str(tiny_dirs["llada"]), prompts_per_step=2, group_size=4, lr=3e-3, lam=0.05, gen_length=8,
              denoise_steps=4, eval_n=4, temperature=1.0)
    log = train_rl(RLConfig(rl_steps=12, checkpoint_every=6, out=str(tmp_path / "a"), **kw), task=count_task)
    assert log["after"]["reward"] > log["before"]["reward"] + 0.2
    rollout = [s["reward"] for s in log["steps"]]
    assert sum(rollout[-3:]) > sum(rollout[:3])
    assert len(log["after"]["correct"]) == 4 and log["after"]["accuracy"] == sum(log["after"]["correct"]) / 4
    lm = load_model(tmp_path / "a" / "checkpoint-00012")
    assert lm.family == "llada" and lm.n_layers == 2 and lm.tokenizer is not None
    # an interrupted run (state saved at step 6) resumed to step 12 ends where the straight run ended
    interrupted = train_rl(RLConfig(rl_steps=6, checkpoint_every=6, out=str(tmp_path / "b"), **kw), task=count_task)
    assert [s["reward"] for s in interrupted["steps"]] == rollout[:6]
    resumed = train_rl(RLConfig(rl_steps=12, checkpoint_every=6, out=str(tmp_path / "b"), resume=True, **kw), task=count_task)
    assert [s["reward"] for s in resumed["steps"]] == rollout
    a, b = (load_model(tmp_path / x / "checkpoint-00012").module.state_dict() for x in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("algo", ["rspo", "diffu-grpo"])
def test_the_default_reference_stays_frozen_while_the_policy_moves(algo, tiny_dirs, count_task, tmp_path):
    """The default reference is a deep copy of --model: after the first update its log-ratio to the policy is
    non-zero (it was exactly zero while the copy still ran the policy's own weights)."""
    log = train_rl(RLConfig(model=str(tiny_dirs["llada"]), algo=algo, rl_steps=3, prompts_per_step=2, group_size=4,
                            lr=1e-3, gen_length=8, denoise_steps=4, eval_n=2, out=str(tmp_path)), task=count_task)
    ratios = [s["log_ratio"] for s in log["steps"]]
    assert ratios[0] == pytest.approx(0.0, abs=1e-5)  # before any update policy == reference
    assert all(abs(r) > 1e-3 for r in ratios[1:]), ratios


def test_diffu_grpo_runs_and_writes_curves(tiny_dirs, count_task, tmp_path):
    log = train_rl(RLConfig(model=str(tiny_dirs["llada"]), algo="diffu-grpo", rl_steps=2, prompts_per_step=2, group_size=2,
                            inner_iters=2, grad_accum=2, gen_length=8, denoise_steps=4, eval_n=2, out=str(tmp_path)),
                   task=count_task)
    assert len(log["steps"]) == 2 and (tmp_path / "curves.html").is_file() and (tmp_path / "checkpoint-00002").is_dir()


def test_spg_raises_reward(tiny_dirs, count_task, tmp_path):
    log = train_rl(RLConfig(model=str(tiny_dirs["llada"]), algo="spg", rl_steps=12, prompts_per_step=2, group_size=4,
                            lr=3e-3, gen_length=8, denoise_steps=4, eval_n=4, spg_block_length=4, out=str(tmp_path)),
                   task=count_task)
    assert log["after"]["reward"] > log["before"]["reward"] + 0.2
    rollout = [s["reward"] for s in log["steps"]]
    assert sum(rollout[-3:]) > sum(rollout[:3])
    assert not any("log_ratio" in s for s in log["steps"])  # no reference model


def test_lora_checkpoint_merged_equals_adapters(tiny_dirs, count_task, tmp_path):
    """Only adapters train; the merged LLaDA folder and PEFT's own loading of `adapter/` equal the live model."""
    from peft import PeftModel

    from dlmscope.rl.trainer import RLRun

    cfg = RLConfig(model=str(tiny_dirs["llada"]), algo="diffu-grpo", lora_r=4, lora_alpha=8.0, rl_steps=2, lr=1e-2,
                   prompts_per_step=2, group_size=2, gen_length=8, denoise_steps=4, eval_n=2, out=str(tmp_path / "r"))
    run = RLRun(cfg, task=count_task)
    with run.folder:
        run.setup()
        base = {k: v.clone() for k, v in run.policy.module.state_dict().items()}
        for step in range(2):
            run.step(step)
        run.finish()
    changed = {k for k, v in run.policy.module.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and all("lora_" in k for k in changed)
    ids = torch.randint(4, 200, (2, 12))
    with torch.no_grad():
        live = run.policy.forward(ids)
        merged = load_model(tmp_path / "r" / "checkpoint-00002")
        torch.testing.assert_close(merged.forward(ids), live, atol=1e-5, rtol=0)
        assert (merged.forward(ids) - load_model(tiny_dirs["llada"]).forward(ids)).abs().max() > 1e-3
        plain = load_model(tiny_dirs["llada"])
        peft = PeftModel.from_pretrained(plain.module, tmp_path / "r" / "checkpoint-00002" / "adapter")
        torch.testing.assert_close(peft(input_ids=ids).logits, live, atol=1e-5, rtol=0)
    # resume continues from the adapter-only state
    resumed = train_rl(RLConfig(**{**cfg.__dict__, "rl_steps": 3, "resume": True}), task=count_task)
    assert len(resumed["steps"]) == 3


def test_out_folder_guard(tiny_dirs, count_task, tmp_path):
    kw = dict(model=str(tiny_dirs["llada"]), rl_steps=1, prompts_per_step=2, group_size=2, gen_length=8, denoise_steps=4,
              eval_n=2, task="sudoku")
    out = tmp_path / "done"
    train_rl(RLConfig(out=str(out), **kw), task=count_task)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(DLMScopeError, match="already exists; pass --resume"):
        train_rl(RLConfig(out=str(out), **kw), task=count_task)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing of the finished run touched
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):  # a file, and a folder that cannot be made
        with pytest.raises(DLMScopeError, match="cannot write to output folder"):
            train_rl(RLConfig(out=str(bad), **kw), task=count_task)


def test_rl_bad_inputs(tiny_dirs, tmp_path, tokenizer):
    from dlmscope.models.tiny import write_tiny_llada

    base = dict(model=str(tiny_dirs["llada"]), out=str(tmp_path / "out"))
    for kw, match in [(dict(group_size=1), "at least 2 completions"), (dict(algo="ppo"), "algo='ppo'; allowed: rspo, diffu-grpo, spg"),
                      (dict(lam=float("nan")), "lam=nan must be a finite number"), (dict(lr=float("inf")), "lr=inf"),
                      (dict(lr=-1.0), r"lr=-1.0 must be a finite number in \(0, inf\)"), (dict(algo="diffu-grpo", clip=1.5), "clip=1.5"),
                      (dict(algo="spg", spg_beta=0.0), "spg_beta=0.0"), (dict(algo="spg", spg_beta=-1.0), "spg_beta"),
                      (dict(spg_beta=1.5), "--spg-beta is an option of spg, not of rspo"),
                      (dict(algo="diffu-grpo", spg_estimate="mix"), "--spg-estimate is an option of spg"),
                      (dict(algo="spg", lam=0.5), "--lam is an option of rspo, not of spg"),
                      (dict(algo="spg", spg_estimate="cubo"), "spg_estimate='cubo'; allowed"),
                      (dict(algo="spg", spg_block_length=16), "into at least mc_draws=2 blocks"),
                      (dict(rl_steps=0), "steps=0 must be an integer >= 1"), (dict(lora_r=-1), "lora_r=-1"),
                      (dict(eval_split="pretrain"), "eval_split='pretrain'; allowed: test, validation")]:
        with pytest.raises(DLMScopeError, match=match):
            train_rl(RLConfig(**base, **kw))
    assert not (tmp_path / "out").exists()  # option errors come before the folder is made
    with pytest.raises(DLMScopeError, match="task='go'; allowed: sudoku, countdown"):
        train_rl(RLConfig(task="go", **base))
    with pytest.raises(DLMScopeError, match="--resume given but .*trainer_state.json' does not exist"):
        train_rl(RLConfig(resume=True, **base))
    with pytest.raises(DLMScopeError, match=r"LoRA targets \['qq_proj'\] match no linear layer; allowed: .*q_proj"):
        train_rl(RLConfig(lora_r=2, lora_targets="q_proj,qq_proj", **base))
    assert not (tmp_path / "out").exists()  # a run that failed before writing leaves no folder
    deeper = write_tiny_llada(tmp_path / "deeper", n_layers=3, vocab_size=len(tokenizer), tokenizer=tokenizer,
                              mask_id=tokenizer.mask_token_id)
    with pytest.raises(DLMScopeError, match="differ in architecture"):
        train_rl(RLConfig(ref=str(deeper), **base))


@pytest.mark.parametrize("args,message", [(["--lam", "nan"], "--lam=nan must be a finite number"),
                                          (["--algo", "rspo", "--spg-beta", "2"], "--spg-beta is an option of spg"),
                                          (["--algo", "spg", "--spg-beta", "0"], "spg_beta=0.0 must be a finite number in (0, inf)")])
def test_cli_bad_option_is_one_line_exit_2(args, message, capsys, tmp_path):
    from dlmscope.cli import main

    with pytest.raises(SystemExit) as e:
        main(["rspo", "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_rl_run_shares_the_run_lifecycle(tiny_dirs, count_task, tmp_path):
    """SIGINT during a step checkpoints and stops (resuming ends where a straight run ends); a --resume with an
    option that changes the result is refused before any model loads: `runstate.Run`, as for SAE runs."""
    import os
    import signal

    from dlmscope.rl.trainer import RLRun

    kw = dict(model=str(tiny_dirs["llada"]), prompts_per_step=2, group_size=2, gen_length=8, denoise_steps=4,
              eval_n=2, rl_steps=3, checkpoint_every=10)
    straight = train_rl(RLConfig(out=str(tmp_path / "a"), **kw), task=count_task)
    original, calls = RLRun.step, {"n": 0}

    def interrupting(self, step):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step)

    RLRun.step = interrupting
    try:
        part = train_rl(RLConfig(out=str(tmp_path / "b"), **kw), task=count_task)
    finally:
        RLRun.step = original
    assert part["interrupted"] and part["signal"] == signal.SIGINT and len(part["steps"]) == 2
    assert (tmp_path / "b" / "checkpoint-00002").is_dir()  # checkpointed at the stop, not only on schedule
    with pytest.raises(DLMScopeError, match=r"--resume with changed options \['lr'\]"):
        train_rl(RLConfig(out=str(tmp_path / "b"), resume=True, **{**kw, "lr": 1e-3}), task=count_task)
    resumed = train_rl(RLConfig(out=str(tmp_path / "b"), resume=True, **kw), task=count_task)
    assert [s["reward"] for s in resumed["steps"]] == [s["reward"] for s in straight["steps"]]
    assert resumed["after"] == straight["after"]


def test_non_finite_gradient_stops_and_keeps_the_last_checkpoint(tiny_dirs, count_task, tmp_path):
    """A policy weight turned NaN (what a diverged update leaves) stops the next update in one line; the earlier
    checkpoint stays and no non-finite checkpoint is written."""
    from dlmscope.rl.trainer import RLRun

    run = RLRun(RLConfig(model=str(tiny_dirs["llada"]), rl_steps=2, checkpoint_every=1, prompts_per_step=1, group_size=2,
                         gen_length=8, denoise_steps=4, eval_n=1, out=str(tmp_path)), task=count_task)
    with run.lock():
        run.setup()
        run.step(0)
        with torch.no_grad():
            next(iter(run.policy.module.parameters())).view(-1)[:10] = float("nan")
        with pytest.raises(DLMScopeError, match=r"stopped at rollout step 2: the policy's gradient norm is nan .*"
                                                 r"the last good checkpoint \(step 1\) is kept"):
            run.step(1)
    assert load_model(tmp_path / "checkpoint-00001").module is not None and not (tmp_path / "checkpoint-00002").exists()


def test_resume_repairs_a_truncated_checkpoint(tiny_dirs, tmp_path, capsys):
    """`rspo --resume` checks the checkpoint written with its state against the recorded checksum and rewrites a
    damaged one from the state, saying so in one line."""
    from dlmscope.cli import main

    argv = ["rspo", "--model", str(tiny_dirs["llada"]), "--task", "sudoku", "--group-size", "2", "--prompts-per-step",
            "1", "--eval-n", "1", "--gen-length", "8", "--denoise-steps", "4", "--out", str(tmp_path)]
    main([*argv, "--rl-steps", "1"])
    weights = tmp_path / "checkpoint-00001" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    capsys.readouterr()
    main([*argv, "--rl-steps", "2", "--resume"])
    err = capsys.readouterr().err
    assert f"repaired {str(weights)!r}" in err and weights.read_bytes() == good
    assert load_model(tmp_path / "checkpoint-00002").n_layers == 2
