import pytest
import torch

from dlmscope.tasks import Example


@pytest.fixture(autouse=True)
def _rl_one_thread(one_thread):
    """Every RL test runs on one thread (see the root conftest)."""


class CountToken:
    """Reward = fraction of the completion's tokens equal to one token id: trivially learnable."""

    name = "count"

    def __init__(self, tokenizer, token_id: int, length: int):
        self.tok, self.target, self.length = tokenizer, token_id, length

    def examples(self, split, n, seed=0):
        return [Example(f"item {i % 5}", "", {}) for i in range(n)]

    def reward(self, ex, text):
        return sum(i == self.target for i in self.tok(text, add_special_tokens=False)["input_ids"]) / self.length

    def is_correct(self, ex, text):
        return self.reward(ex, text) >= 1.0


@pytest.fixture(scope="session")
def count_task(llada, tokenizer):
    """Target = a token the random tiny LLaDA emits sometimes but not always after 'item i'."""
    from collections import Counter

    from dlmscope import generate

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = generate(llada, ["item 1"] * 16, gen_length=8, steps=4, block_length=8, temperature=1.0, seed=0)
    torch.set_num_threads(n)
    counts = Counter(t for text in out.texts for t in tokenizer(text, add_special_tokens=False)["input_ids"])
    return CountToken(tokenizer, counts.most_common(2)[1][0], 8)
