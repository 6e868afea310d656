import pytest
import torch

from dlmscope import load_model


@pytest.mark.parametrize("family,sees_future", [("llada", True), ("dream", True), ("causal", False)])
def test_position_zero_sees_later_tokens_only_in_dlms(tiny_dirs, family, sees_future):
    lm = load_model(tiny_dirs[family])
    ids = torch.randint(4, 100, (1, 8))
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 1) % 100
    with torch.no_grad():
        a, b = lm.forward(ids), lm.forward(other)
    changed = float((a[0, 0] - b[0, 0]).abs().max())
    assert (changed > 1e-4) == sees_future, f"{family}: |d logits[0]| = {changed}"
    if not sees_future:  # causal: everything before the edit is untouched
        torch.testing.assert_close(a[0, :-1], b[0, :-1])


@pytest.mark.parametrize("family", ["llada", "dream", "causal"])
@torch.no_grad()
def test_padding_leaves_real_positions_unchanged(tiny_dirs, family):
    """Rows padded on the left or the right give the same logits on real tokens as the unpadded row."""
    lm = load_model(tiny_dirs[family])
    ids = torch.randint(4, 100, (1, 6))
    ref = lm.forward(ids)[0]
    pad = torch.zeros(1, 3, dtype=torch.long)
    full = torch.randint(4, 100, (1, 9))  # an unpadded neighbour in the same batch
    right = torch.cat([torch.cat([ids, pad], 1), full])
    left = torch.cat([torch.cat([pad, ids], 1), full])
    mask_right = torch.tensor([[1] * 6 + [0] * 3, [1] * 9])
    mask_left = torch.tensor([[0] * 3 + [1] * 6, [1] * 9])
    torch.testing.assert_close(lm.forward(right, mask_right)[0, :6], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lm.forward(right, mask_right)[1], lm.forward(full)[0], atol=1e-5, rtol=1e-5)
    if family == "causal":  # absolute positions shift under left padding unless position ids follow the mask
        return
    torch.testing.assert_close(lm.forward(left, mask_left)[0, 3:], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llada", "dream"])
@torch.no_grad()
def test_padding_really_is_masked(tiny_dirs, family):
    """Changing a pad token's id must not move real logits (the mask hides it from every query)."""
    lm = load_model(tiny_dirs[family])
    ids = torch.randint(4, 100, (1, 9))
    mask = torch.tensor([[1] * 6 + [0] * 3])
    other = ids.clone()
    other[0, 7] = (other[0, 7] + 5) % 100
    torch.testing.assert_close(lm.forward(ids, mask)[0, :6], lm.forward(other, mask)[0, :6])
    assert (lm.forward(ids)[0, :6] - lm.forward(other)[0, :6]).abs().max() > 1e-4  # unmasked, it would
