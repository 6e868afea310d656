"""Prompt batches for the samplers: strings, token lists or a tensor, left-padded to one (B, P) batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DLMScopeError
from ..models.base import LoadedModel


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (B, P) ids and a 1/0 attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        if len(p):
            ids[b, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[b, width - len(p):] = 1
    return ids, mask


def prepare_prompts(lm: LoadedModel, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        return prompts.long(), torch.ones_like(prompts, dtype=torch.long)
    prompts = list(prompts)
    if not prompts:
        raise DLMScopeError("the prompt list is empty; give at least one prompt")
    if all(isinstance(p, str) for p in prompts):
        prompts = lm.to_tokens(prompts)
    pad = lm.pad_id  # `models.ids`: the tokenizer's, config.json's, else EOS (never the mask id if avoidable)
    if pad is None:
        pad = getattr(lm.tokenizer, "pad_token_id", None) if lm.tokenizer is not None else None
    return left_pad(prompts, pad if pad is not None else lm.require_mask_id())
