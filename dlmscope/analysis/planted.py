"""A planted feature: a checkpoint whose difference from the base is known exactly (the positive control of model
diffing).

`plant_feature(lm, layer, direction, trigger, strength)` returns a copy of `lm` whose residual stream after block
`layer` (`blocks.{layer}.hook_resid_post`) gains `strength * direction / |direction|` at every position whose input
token is one of `trigger`, and is unchanged everywhere else. The edit is an exact write into the forward (a hook on
the copy's module that reads the input ids), not a weight edit: no weight edit of a pre-norm transformer adds a
fixed vector at one layer on one token and nothing elsewhere (every weight the token's embedding meets is also met
by other tokens, and the norms see any change of the residual). Layers after `layer` read the edited residual, so
the copy's outputs change as a fine-tune's would; the diffed hook itself carries exactly the planted direction.

A masked position does not fire: the trigger is the input token, so under diffusion masking the feature fires on
visible trigger tokens only, as a feature of the input would.
"""

from __future__ import annotations

import copy

import torch

from .. import checks
from ..errors import DLMScopeError
from ..hooks import install_edit
from ..models.base import LoadedModel


def trigger_mask(ids: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: where the input token is one of `trigger`."""
    return torch.isin(ids, trigger.to(ids.device))


def plant_feature(lm: LoadedModel, layer: int, direction: torch.Tensor, trigger: int | list[int] | torch.Tensor,
                  strength: float) -> LoadedModel:
    """A copy of `lm` with `strength` times the unit `direction` added to blocks.{layer}.hook_resid_post wherever the
    input token is in `trigger` (module docstring). `lm` itself is left unchanged."""
    checks.integer("layer", layer, 0, lm.n_layers - 1)
    checks.number("strength", strength)
    direction = torch.as_tensor(direction, dtype=torch.float32).flatten()
    if direction.numel() != lm.d_model or not bool(torch.isfinite(direction).all()) or float(direction.norm()) == 0:
        raise DLMScopeError(f"direction has {direction.numel()} entries (norm {float(direction.norm()):.3g}); "
                            f"allowed: a finite non-zero vector of d_model={lm.d_model} entries")
    ids = torch.as_tensor(trigger, dtype=torch.long).flatten()
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= lm.vocab_size:
        raise DLMScopeError(f"trigger={ids.tolist()}; allowed: one or more token ids in 0..{lm.vocab_size - 1}")
    planted = copy.deepcopy(lm)
    embed = getattr(planted.module, "get_input_embeddings")()  # a transformers method, untyped on nn.Module
    seen: dict[str, torch.Tensor] = {}

    def remember(module, args, kwargs):
        seen["fires"] = trigger_mask(args[0] if args else kwargs["input"], ids)

    def write(act: torch.Tensor) -> torch.Tensor:
        fires = seen["fires"]
        if fires.shape != act.shape[:2]:
            raise DLMScopeError(f"planted feature: input ids {tuple(fires.shape)} do not match the residual "
                                f"{tuple(act.shape[:2])}")
        add = (strength * direction / direction.norm()).to(act.device, act.dtype)
        return act + fires.to(act.device, act.dtype)[..., None] * add

    embed.register_forward_pre_hook(remember, with_kwargs=True)
    install_edit(planted.site(f"blocks.{layer}.hook_resid_post"), write)
    planted.name = f"{lm.name}+planted(L{layer}, strength {strength:g}, trigger {ids.tolist()})"
    return planted
