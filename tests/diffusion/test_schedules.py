"""Schedules (`dlmscope.diffusion.schedules`): how many positions each step reveals."""

import torch

from dlmscope.diffusion.schedules import DreamSchedule, get_schedule, transfer_schedule


def test_schedule_linear_with_remainder():
    s = transfer_schedule(torch.tensor([10, 8, 0]), 4)
    assert s.tolist() == [[3, 3, 2, 2], [2, 2, 2, 2], [0, 0, 0, 0]]


def test_schedules_count_as_upstream():
    """linear: LLaDA's even split, remainder first; dream: int(n * (1 - t[i+1]/t[i])) on linspace(1, eps, steps+1)."""
    n = torch.tensor([24, 16, 0])
    assert get_schedule("linear").plan(n, 7).tolist() == transfer_schedule(n, 7).tolist()
    assert transfer_schedule(torch.tensor([24]), 7).tolist() == [[4, 4, 4, 3, 3, 3, 3]]
    # t = 1, .8335, .667, ...: step 0 reveals int(24 * 0.1665) = 3 (LLaDA: 4); the last step the rest
    assert get_schedule("dream").plan(n, 6).tolist() == [[3, 4, 4, 4, 4, 5], [2, 2, 2, 3, 3, 4], [0] * 6]
    assert get_schedule("dream", eps=0.5).plan(torch.tensor([24]), 4).tolist() == [[3, 2, 3, 16]]
    assert isinstance(get_schedule(DreamSchedule(0.1)), DreamSchedule)
