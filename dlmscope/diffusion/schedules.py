"""Schedules: how many of a block's still-masked positions a denoising step reveals.

`linear` is LLaDA's even split (remainder first); `dream` is Dream's `int(n * (1 - s/t))` on
`linspace(1, eps, steps + 1)`. A family's own schedule is its registration's (`models.families`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import DLMScopeError
from ..models.base import LoadedModel


class Schedule:
    """How many still-masked positions of a block step `i` of `steps` reveals. Subclass to add one."""

    name = "base"

    def default_block_length(self, gen_length: int) -> int:
        """Block length when the caller gives none: 32 when it divides the generation, else one block."""
        return 32 if gen_length % 32 == 0 else gen_length

    def fraction(self, i: int, steps: int) -> float | torch.Tensor:
        """Share of the still-masked positions step i reveals (`origin` reveals each with this probability)."""
        raise NotImplementedError

    def counts(self, n_masked: torch.Tensor, i: int, steps: int) -> torch.Tensor:
        """(B,) positions to reveal at step i, given the (B,) masked counts before it."""
        raise NotImplementedError

    def plan(self, n_masked: torch.Tensor, steps: int) -> torch.Tensor:
        """(B, steps) counts when every step reveals exactly what it is told."""
        out, left = [], n_masked.clone()
        for i in range(steps):
            out.append(self.counts(left, i, steps))
            left = left - out[-1]
        return torch.stack(out, 1)


class LinearSchedule(Schedule):
    """LLaDA: n // steps per step, the remainder to the first steps (as ceil(left / steps left))."""

    name = "linear"

    def fraction(self, i: int, steps: int) -> float:
        return 1.0 / (steps - i)

    def counts(self, n_masked: torch.Tensor, i: int, steps: int) -> torch.Tensor:
        k = steps - i
        return (n_masked + k - 1) // k


class DreamSchedule(Schedule):
    """Dream `diffusion_generate`: t = linspace(1, eps, steps + 1); step i reveals int(n * (1 - t[i+1]/t[i])).

    Computed in float32 as upstream does (the truncation depends on it); the last step reveals the rest.
    Dream has no blocks, so by default the whole generation is one block.
    """

    name = "dream"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def default_block_length(self, gen_length: int) -> int:
        return gen_length

    def fraction(self, i: int, steps: int) -> float | torch.Tensor:
        if i == steps - 1:
            return 1.0
        t = torch.linspace(1, self.eps, steps + 1, dtype=torch.float32)
        return 1 - t[i + 1] / t[i]

    def counts(self, n_masked: torch.Tensor, i: int, steps: int) -> torch.Tensor:
        if i == steps - 1:
            return n_masked.clone()
        frac = torch.as_tensor(self.fraction(i, steps)).to(n_masked.device)
        return (n_masked.to(torch.float32) * frac).long()


SCHEDULES: dict[str, Callable[..., Schedule]] = {"linear": LinearSchedule, "dream": DreamSchedule}


def default_schedule(lm: LoadedModel) -> str:
    """Each family samples as its own upstream does (its registration's `schedule`: Dream `dream`, others `linear`)."""
    from ..models.families import FAMILIES

    family = FAMILIES.get(lm.family)
    return family.schedule if family is not None else "linear"


def get_schedule(schedule: str | Schedule, eps: float = 1e-3) -> Schedule:
    if isinstance(schedule, Schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise DLMScopeError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    return DreamSchedule(eps) if schedule == "dream" else SCHEDULES[schedule]()


def transfer_schedule(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) tokens to unmask per step under LLaDA's linear schedule."""
    return LinearSchedule().plan(n_masked, steps)
