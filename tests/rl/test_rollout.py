import pytest
import torch

from dlmscope.rl import group_advantages, sample_groups


def test_advantages_zero_for_constant_rewards():
    for normalise in (False, True):
        assert torch.equal(group_advantages(torch.ones(12), 4, normalise), torch.zeros(12))
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]), 4)
    assert a[:4].sum().abs() < 1e-6 and a[0] > 0 and torch.equal(a[4:], torch.zeros(4))
    assert torch.allclose(group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), 4, True).abs(), torch.full((4,), 0.866), atol=1e-3)


def test_sample_groups_shapes(llada, count_task):
    ex = count_task.examples("train", 2)
    roll = sample_groups(llada, count_task, ex, 3, gen_length=8, steps=4, temperature=1.0, seed=0)
    assert roll.seqs.shape[0] == 6 and roll.completion.sum(1).eq(8).all()
    assert not (roll.completion & ~roll.attn.bool()).any()
    assert torch.allclose(roll.advantages.view(2, 3).sum(1), torch.zeros(2), atol=1e-6)


def test_rollouts_and_evaluation_take_the_schedule(llada, count_task):
    from dlmscope import DLMScopeError
    from dlmscope.rl.rollout import evaluate

    ex = count_task.examples("train", 2)
    kw = dict(gen_length=8, steps=4, temperature=1.0, seed=0)
    assert torch.equal(sample_groups(llada, count_task, ex, 2, **kw).seqs,
                       sample_groups(llada, count_task, ex, 2, schedule="linear", **kw).seqs)
    for call in (lambda: sample_groups(llada, count_task, ex, 2, schedule="cosine", **kw),
                 lambda: evaluate(llada, count_task, ex, gen_length=8, steps=4, schedule="cosine")):
        with pytest.raises(DLMScopeError, match="unknown schedule 'cosine'"):
            call()


def test_rollouts_and_evaluation_take_fast_decoding(llada, count_task):
    from dlmscope.rl.rollout import evaluate

    ex = count_task.examples("train", 2)
    kw = dict(gen_length=8, steps=8, temperature=1.0, seed=0)
    # threshold 1.0 with 8 steps for 8 tokens reveals one token per step, as plain decoding
    assert torch.equal(sample_groups(llada, count_task, ex, 2, **kw).seqs,
                       sample_groups(llada, count_task, ex, 2, threshold=1.0, **kw).seqs)
    # a threshold below every confidence reveals the block at once: only the forward that refreshes the cache
    assert evaluate(llada, count_task, ex, gen_length=8, steps=1) == \
        evaluate(llada, count_task, ex, gen_length=8, steps=8, threshold=1e-9, cache="prefix")
