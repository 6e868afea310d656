"""Live conversion to and from SAELens objects, so SAELens' own tools run on our SAEs in one line.

The same mapping as our files (`io.saelens_state` / `io.from_saelens_state`), without the disk: Top-K SAEs
become SAELens' `TopKSAE`, BatchTopK, Matryoshka and JumpReLU SAEs its `JumpReLUSAE` (one threshold per
latent), transcoders its `JumpReLUTranscoder` / `JumpReLUSkipTranscoder`, with the input scale folded in.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DLMScopeError
from .io import from_saelens_state, saelens_state
from .model import SAE


def to_sae_lens(sae: SAE) -> Any:
    """A `sae_lens.SAE` computing what `sae` computes (same device, float32), metadata included."""
    from sae_lens import SAE as SAELensSAE

    cfg, weights = saelens_state(sae)
    theirs = SAELensSAE.from_dict({**cfg, "device": str(sae.device)})
    theirs.process_state_dict_for_loading(weights)
    theirs.load_state_dict({n: w.to(sae.device) for n, w in weights.items()})
    return theirs.eval()


def from_sae_lens(theirs: Any, device: str | torch.device | None = None) -> SAE:
    """Our SAE from a `sae_lens.SAE` (Top-K, JumpReLU or a JumpReLU (skip) transcoder), on its device or `device`."""
    from sae_lens import SAE as SAELensSAE

    if not isinstance(theirs, SAELensSAE):
        raise DLMScopeError(f"from_sae_lens needs a sae_lens.SAE, not {type(theirs).__name__}")
    state = {n: t.detach().float().cpu().clone() for n, t in theirs.state_dict().items()}
    theirs.process_state_dict_for_saving(state)
    where = f"sae_lens {type(theirs).__name__}"
    ours = from_saelens_state(theirs.cfg.to_dict(), state, where, where)
    return ours.to(device if device is not None else next(theirs.parameters()).device)
