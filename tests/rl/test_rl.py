import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.rl.losses import completion_masks, elbo_logp, group_advantages, rspo_loss
from dlmscope.tasks import Example


def test_rspo_gradient_is_regression_onto_advantage_target():
    torch.manual_seed(0)
    d1 = torch.randn(8, requires_grad=True)
    d2 = d1.detach().clone().requires_grad_(True)
    A, lam = torch.randn(8), 0.3
    rspo_loss(d1, A, lam).backward()
    d_hat = d2 - d2.mean()
    (0.5 * lam * (d_hat - A / lam) ** 2).mean().backward()
    torch.testing.assert_close(d1.grad, d2.grad)


def test_advantages_zero_for_constant_rewards():
    assert torch.equal(group_advantages(torch.ones(12), 4), torch.zeros(12))
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    assert a.sum().abs() < 1e-6 and a[0] > 0


def test_same_masks_for_policy_and_reference(llada):
    seqs = torch.randint(4, 200, (3, 10))
    attn = torch.ones_like(seqs)
    completion = torch.zeros_like(seqs, dtype=torch.bool)
    completion[:, 6:] = True
    masks, t = completion_masks(completion, 3, torch.Generator().manual_seed(0))
    assert (masks <= completion).all() and masks.any(-1).all()
    d = elbo_logp(llada, seqs, attn, masks, t) - elbo_logp(llada, seqs, attn, masks, t)
    assert torch.equal(d, torch.zeros(3))  # identical models and shared masks: exactly zero log-ratio


class CountToken:
    """Reward = fraction of completion tokens equal to one token: trivially learnable."""

    name = "count"

    def __init__(self, tokenizer, token_id):
        self.tok, self.target = tokenizer, token_id

    def examples(self, split, n, seed=0):
        return [Example(f"item {i % 5}", "", {}) for i in range(n)]

    def reward(self, ex, text):
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return sum(i == self.target for i in ids) / 8

    def is_correct(self, ex, text):
        return self.reward(ex, text) == 1.0


def test_rspo_raises_reward_and_checkpoints_reload(tiny_dirs, tokenizer, tmp_path):
    from dlmscope.models import load_model
    from dlmscope.rl import RLConfig, train_rl

    from collections import Counter

    from dlmscope import generate

    lm0 = load_model(tiny_dirs["llada"])
    sample = generate(lm0, ["item 1"] * 16, gen_length=8, steps=4, block_length=8, temperature=1.0, seed=0)
    counts = Counter(t for text in sample.texts for t in tokenizer(text, add_special_tokens=False)["input_ids"])
    target = counts.most_common(2)[1][0]  # a token the random model emits sometimes, not always
    task = CountToken(tokenizer, target)
    cfg = RLConfig(model=str(tiny_dirs["llada"]), steps=12, prompts_per_step=2, group_size=4, lr=3e-3, lam=0.05,
                   gen_length=8, denoise_steps=4, eval_n=4, checkpoint_every=6, out=str(tmp_path), temperature=1.0)
    log = train_rl(cfg, task=task)
    assert log["after"]["reward"] > log["before"]["reward"]
    lm = load_model(tmp_path / "checkpoint-00012")
    assert lm.family == "llada" and lm.n_layers == 2


def test_rl_bad_inputs(tiny_dirs, tmp_path):
    from dlmscope.rl import RLConfig, train_rl

    with pytest.raises(DLMScopeError, match="at least 2 completions"):
        train_rl(RLConfig(model=str(tiny_dirs["llada"]), group_size=1, out=str(tmp_path)))
    with pytest.raises(DLMScopeError, match="unknown task 'go'"):
        train_rl(RLConfig(model=str(tiny_dirs["llada"]), task="go", out=str(tmp_path)))
    with pytest.raises(DLMScopeError, match="unknown algo"):
        train_rl(RLConfig(model=str(tiny_dirs["llada"]), algo="ppo", out=str(tmp_path)))
