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
    log = train_rl(RLConfig(steps=12, checkpoint_every=6, out=str(tmp_path / "a"), **kw), task=count_task)
    assert log["after"]["reward"] > log["before"]["reward"] + 0.2
    rollout = [s["reward"] for s in log["steps"]]
    assert sum(rollout[-3:]) > sum(rollout[:3])
    lm = load_model(tmp_path / "a" / "checkpoint-00012")
    assert lm.family == "llada" and lm.n_layers == 2 and lm.tokenizer is not None
    # an interrupted run (state saved at step 6) resumed to step 12 ends where the straight run ended
    interrupted = train_rl(RLConfig(steps=6, checkpoint_every=6, out=str(tmp_path / "b"), **kw), task=count_task)
    assert [s["reward"] for s in interrupted["steps"]] == rollout[:6]
    resumed = train_rl(RLConfig(steps=12, checkpoint_every=6, out=str(tmp_path / "b"), resume=True, **kw), task=count_task)
    assert [s["reward"] for s in resumed["steps"]] == rollout
    a, b = (load_model(tmp_path / x / "checkpoint-00012").module.state_dict() for x in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_diffu_grpo_runs_and_writes_curves(tiny_dirs, count_task, tmp_path):
    log = train_rl(RLConfig(model=str(tiny_dirs["llada"]), algo="diffu-grpo", steps=2, prompts_per_step=2, group_size=2,
                            inner_iters=2, grad_accum=2, gen_length=8, denoise_steps=4, eval_n=2, out=str(tmp_path)),
                   task=count_task)
    assert len(log["steps"]) == 2 and (tmp_path / "curves.html").is_file() and (tmp_path / "checkpoint-00002").is_dir()


def test_rl_bad_inputs(tiny_dirs, tmp_path, tokenizer):
    from dlmscope.models.tiny import write_tiny_llada

    base = dict(model=str(tiny_dirs["llada"]), out=str(tmp_path))
    with pytest.raises(DLMScopeError, match="at least 2 completions"):
        train_rl(RLConfig(group_size=1, **base))
    with pytest.raises(DLMScopeError, match="unknown task 'go'"):
        train_rl(RLConfig(task="go", **base))
    with pytest.raises(DLMScopeError, match="unknown algo"):
        train_rl(RLConfig(algo="ppo", **base))
    with pytest.raises(DLMScopeError, match="does not exist"):
        train_rl(RLConfig(resume=True, **base))
    deeper = write_tiny_llada(tmp_path / "deeper", n_layers=3, vocab_size=len(tokenizer), tokenizer=tokenizer,
                              mask_id=tokenizer.mask_token_id)
    with pytest.raises(DLMScopeError, match="differ in architecture"):
        train_rl(RLConfig(ref=str(deeper), **base))
