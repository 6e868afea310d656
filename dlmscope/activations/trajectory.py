"""Activations along a sampler trajectory: one batch per denoising step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DLMScopeError
from ..models.base import LoadedModel
from .source import ActivationBatch

TRAJECTORY_POSITIONS = ("all", "masked", "unmasked")


@torch.no_grad()
def trajectory_activations(lm: LoadedModel, prompts, hooks: Sequence[str], *, at_steps=None, positions: str = "all",
                           **generate_kwargs) -> list[ActivationBatch]:
    """Activations from a real sampler run, one ActivationBatch per captured denoising step.

    `at_steps`: None (every step), step indices or a predicate, as in `dlmscope.hooks.capture`. Rows are
    kept at `positions` (all, masked or unmasked at that step). Per row, `token` is the input id at that
    step (the mask id where still masked), `doc` the prompt index, `t` the fraction of generated positions
    still masked and `step` the step index. Other keyword arguments go to `diffusion.sampler.generate`.
    """
    from ..diffusion.sampler import generate
    from ..hooks import capture

    if positions not in TRAJECTORY_POSITIONS:
        raise DLMScopeError(f"unknown positions {positions!r}; allowed: {', '.join(TRAJECTORY_POSITIONS)}")
    for h in hooks:
        lm.site(h)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def remember(record) -> None:  # only ids, mask and t: the record's logits are not kept
        seen[record.step] = (record.x.cpu(), record.mask.cpu(), record.t)

    with capture(lm, hooks, steps=at_steps, to_cpu=True) as cache:
        generate(lm, prompts, callback=remember, **generate_kwargs)
    out = []
    for i, step in enumerate(cache.steps[hooks[0]]):
        assert step is not None  # captured inside the sampler, which numbers its steps
        x, masked, t = seen[step]
        B, L = x.shape
        keep = {"all": torch.ones_like(masked), "masked": masked, "unmasked": ~masked}[positions]
        acts = {h: cache.acts[h][i][:B][keep].float() for h in hooks}  # [:B] drops the CFG half
        info = {"token": x[keep], "position": torch.arange(L).expand(B, L)[keep],
                "doc": torch.arange(B)[:, None].expand(B, L)[keep], "t": torch.full((B, L), t)[keep],
                "masked": masked[keep], "step": torch.full((B, L), step)[keep]}
        out.append(ActivationBatch(acts, info))
    return out
