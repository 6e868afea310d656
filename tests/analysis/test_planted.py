import pytest
import torch

from dlmscope.analysis.planted import plant_feature, trigger_mask
from dlmscope.errors import DLMScopeError
from dlmscope.hooks import run_with_cache
from dlmscope.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def lm():
    return load_model("dlmscope-tiny-dlm")


def test_plant_adds_exactly_the_direction_on_trigger_tokens_and_nothing_elsewhere(lm):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 400, (3, 24), generator=gen)
    ids[0, 5] = ids[2, 0] = ids[1, 17] = 77  # the trigger at three places, one of them twice in a row below
    ids[1, 18] = 78
    ids[2, 9] = lm.mask_id  # a masked position is not a trigger
    direction = torch.randn(lm.d_model, generator=gen) * 3.0  # not unit: the edit normalises it
    planted = plant_feature(lm, 1, direction, [77, 78], strength=2.5)
    before = run_with_cache(lm, ids, [HOOK, "blocks.0.hook_resid_post"])
    after = run_with_cache(planted, ids, [HOOK, "blocks.0.hook_resid_post"])
    fires = trigger_mask(ids, torch.tensor([77, 78]))
    assert int(fires.sum()) == 4
    delta = after[HOOK] - before[HOOK]
    assert torch.equal(delta[~fires], torch.zeros_like(delta[~fires]))  # exactly zero off-trigger
    want = 2.5 * direction / direction.norm()
    torch.testing.assert_close(delta[fires], want.expand(4, -1), atol=1e-5, rtol=0)
    assert torch.equal(after["blocks.0.hook_resid_post"], before["blocks.0.hook_resid_post"])  # earlier layer untouched
    # later layers read the edited residual (the output changes on trigger rows), and the base model is unchanged
    assert not torch.allclose(planted.denoise_logits(ids)[0], lm.denoise_logits(ids)[0])
    torch.testing.assert_close(run_with_cache(lm, ids, [HOOK])[HOOK], before[HOOK], atol=0, rtol=0)


def test_plant_without_a_trigger_token_in_the_input_changes_nothing(lm):
    ids = torch.randint(10, 400, (2, 16), generator=torch.Generator().manual_seed(1))
    ids[ids == 5] = 6
    planted = plant_feature(lm, 2, torch.ones(lm.d_model), 5, strength=100.0)
    torch.testing.assert_close(planted.denoise_logits(ids), lm.denoise_logits(ids), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, words", [
    ({"layer": 6}, "layer=6"),
    ({"direction": torch.zeros(256)}, "direction"),
    ({"direction": torch.ones(3)}, "d_model=256"),
    ({"trigger": [4096]}, "trigger=[4096]"),
    ({"trigger": []}, "trigger=[]"),
    ({"strength": float("nan")}, "strength"),
])
def test_plant_refuses_bad_input_in_one_line(lm, kwargs, words):
    args = {"layer": 1, "direction": torch.ones(256), "trigger": [7], "strength": 1.0} | kwargs
    with pytest.raises(DLMScopeError, match=words.replace("[", r"\[").replace("]", r"\]")) as e:
        plant_feature(lm, **args)
    assert "\n" not in str(e.value)
