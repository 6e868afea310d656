import pytest
import torch

from dlmscope import DLMScopeError, generate
from dlmscope.diffusion.sampler import REMASKING, transfer_schedule


def test_schedule_linear_with_remainder():
    s = transfer_schedule(torch.tensor([10, 8]), 4)
    assert s.tolist() == [[3, 3, 2, 2], [2, 2, 2, 2]]


@pytest.mark.parametrize("strategy", sorted(REMASKING))
def test_sampler_invariants(llada, strategy):
    out = generate(llada, [[5, 6, 7], [8, 9]], gen_length=8, steps=4, block_length=4, remasking=strategy,
                   return_history=True, seed=0)
    P, mask_id = out.prompt_length, llada.mask_id
    assert not (out.generated == mask_id).any()
    for i, rec in enumerate(out.history):
        block = rec.step // 2
        lo, hi = P + block * 4, P + (block + 1) * 4
        assert not rec.transfer[:, :lo].any() and not rec.transfer[:, hi:].any()  # blocks in order
        assert (rec.transfer <= rec.mask).all()  # only masked positions are revealed
        nxt = out.history[i + 1].x if i + 1 < len(out.history) else out.sequences
        assert torch.equal(nxt, torch.where(rec.transfer, rec.x0, rec.x))  # history consistent, no remasking
        if strategy not in ("origin",):
            assert rec.transfer.sum(1).tolist() == [2, 2]


def test_cfg_and_temperature_run(llada):
    out = generate(llada, [[5, 6, 7]], gen_length=4, steps=4, block_length=4, cfg_scale=1.0, temperature=1.0, seed=1)
    assert out.generated.shape == (1, 4)


def test_bad_inputs(llada):
    with pytest.raises(DLMScopeError, match="not divisible"):
        generate(llada, [[5]], gen_length=10, steps=5, block_length=4)
    with pytest.raises(DLMScopeError, match="steps=0 out of range"):
        generate(llada, [[5]], gen_length=8, steps=0, block_length=8)
    with pytest.raises(DLMScopeError, match="prompt list is empty"):
        generate(llada, [], gen_length=8, steps=8, block_length=8)
    with pytest.raises(DLMScopeError, match="unknown remasking"):
        generate(llada, [[5]], gen_length=8, steps=8, block_length=8, remasking="best")
