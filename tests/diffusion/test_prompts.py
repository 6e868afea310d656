"""Prompt batching (`dlmscope.diffusion.prompts`)."""

from dlmscope.diffusion.prompts import left_pad


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
