"""The model call of one denoising step, full or through Fast-dLLM's block-wise KV cache."""

from __future__ import annotations

import torch

from ..errors import DLMScopeError
from ..models.base import ForwardState, LoadedModel
from ..models.kvcache import BlockKVCache, check_cache
from .remasking import Remasking, check_threshold


class StepForward:
    """The model call of one denoising step: a full forward, or Fast-dLLM's block-wise KV cache.

    With a cache, the first step of each block is a full forward that refreshes the cache; the
    other steps compute only the cache's window (`prefix`: the block and everything after it;
    `dual`: the block; Dream-style shifted models one position more on the left), and the logits
    of the other positions are those of the last forward that computed them. Not recomputed on a
    cached step: the positions before the block (`prefix`, `dual`) and after it (`dual`).
    Hooks still run on every step, on the window only; `lm.state.window` = (start, end) says which
    positions the activations cover, and position selectors (given over the whole sequence) are
    cut to it, so `capture(positions="masked")` sees every masked position under `prefix` (they all
    lie in the window) and only the current block's under `dual`.
    """

    def __init__(self, lm: LoadedModel, cache: str | None):
        self.lm = lm
        self.cache = BlockKVCache(lm, cache) if cache is not None else None
        self.last: torch.Tensor | None = None
        self.count = 0

    def __call__(self, ids: torch.Tensor, attn: torch.Tensor, state: ForwardState, lo: int, hi: int,
                 first_in_block: bool, clean: torch.Tensor | None = None) -> torch.Tensor:
        """Denoising logits of `ids`; `clean` (teacher forcing) lets a block-diffusion model read each block
        given the clean earlier blocks (`LoadedModel.denoise_logits`)."""
        self.count += 1
        if self.cache is None:
            self.lm.state = state
            return self.lm.denoise_logits(ids, attn, clean=clean)
        if first_in_block:
            self.lm.state = state
            self.last = self.cache.refresh(ids, attn, lo, hi)
            return self.last
        state.window = self.cache.window
        self.lm.state = state
        fresh = self.cache.step(ids)
        assert self.last is not None, "a cached step follows its block's first (refreshing) step"
        logits = self.last.clone()
        logits[:, lo:lo + fresh.shape[1]] = fresh
        self.last = logits
        return logits


def check_fast_options(lm: LoadedModel, threshold: float | None, cache: str | None,
                       strategy: Remasking | None = None) -> None:
    """One-line errors for Fast-dLLM's options, before any work."""
    if lm.causal and (threshold is not None or cache is not None):
        raise DLMScopeError(f"threshold / cache are diffusion sampler options; {lm.name} is autoregressive")
    check_threshold(threshold, strategy)
    check_cache(lm, cache)
