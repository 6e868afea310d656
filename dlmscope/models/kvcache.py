"""Fast-dLLM's block-wise approximate KV cache for a bidirectional decoder (LLaDA, Dream).

At each block start one full forward computes every position and keeps the keys/values of the
positions the following steps will not recompute: everything before the block (`prefix`), or
everything outside the block (`dual`: prefix and the masked suffix). Within the block each step
runs only its window (`prefix`: block start to the end; `dual`: the block) and attends to the
kept keys/values, which go stale as the block fills: that is the approximation (arXiv 2505.22618).
Models whose logits are shifted (Dream: position i-1 predicts token i) recompute one more
position on the left, so the block's first token is predicted by a fresh position.

Attention sites on a cached step cover the window: q/k/v/z/attn_out (B, window, ...), `hook_pattern`
(B, heads, window, kept + window) with the kept keys first (`_KeptKV` order: prefix, then suffix).
Keys and values pass their hooks before `update`, so an edit at a refresh is what later steps read.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from ..errors import DLMScopeError
from .base import LoadedModel

CACHE_MODES = ("prefix", "dual", "block")
"""`prefix`: keys/values before the current block; `dual`: also those after it; `block`: block-diffusion
models (LLaDA 2.x) only, the finished blocks' keys/values, exact because attention is causal across blocks."""


class _RecordingKV:
    """Like `_KeptKV`, and remembers each layer's concatenated keys/values (to keep a prefix of them)."""

    def __init__(self, kept: "_KeptKV"):
        self.kept = kept
        self.layers: list[SimpleNamespace] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.kept.update(key_states, value_states, layer_idx)
        self.layers.append(SimpleNamespace(keys=keys, values=values))
        return keys, values


class _KeptKV:
    """The transformers `Cache` protocol (only `update`) over fixed keys/values that are never appended to."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return (torch.cat([self.keys[layer_idx], key_states], -2),
                torch.cat([self.values[layer_idx], value_states], -2))


def check_cache(lm: LoadedModel | None, mode: str | None) -> None:
    """Raise one line unless `mode` is None or a cache mode `lm` can run (lm None: check the name only)."""
    if mode is None:
        return
    if mode not in CACHE_MODES:
        raise DLMScopeError(f"cache={mode!r}; allowed: {', '.join(CACHE_MODES)} or none")
    if lm is None:
        return
    if (mode == "block") != bool(lm.block_size):
        raise DLMScopeError(f"cache={mode!r} " + ("is exact only for block-diffusion models (LLaDA 2.x); "
                            f"{lm.name} is {lm.family}" if mode == "block" else
                            f"approximates bidirectional attention; {lm.name} is a block-diffusion model: use cache='block'"))
    if lm.kv_call is None:
        raise DLMScopeError(
            f"cache={mode!r} needs a native LLaDA or Dream model (bidirectional transformers decoder); "
            f"{lm.name} is {lm.family}" + (" on the remote backend" if lm.family in ("llada", "dream") else "")
        )


class BlockKVCache:
    """One sampler run's cache: `refresh` at each block start, then `step` for the other steps of the block."""

    def __init__(self, lm: LoadedModel, mode: str):
        check_cache(lm, mode)
        self.lm, self.mode = lm, mode
        self.kept: _KeptKV | None = None
        self.key_mask: torch.Tensor | None = None  # (B, kept + window) bool, real keys
        self.window: tuple[int, int] = (0, 0)  # positions a cached step recomputes (hooks see these)
        self.lo = 0  # first position whose denoising logits a cached step returns

    def _kv_call(self, *args: Any) -> tuple[torch.Tensor, Any]:
        kv_call = self.lm.kv_call
        assert kv_call is not None, "check_cache refuses models without a kv_call"
        return kv_call(*args)

    def _block_size(self) -> int:
        assert self.lm.block_size, "check_cache allows cache='block' only on block models"
        return self.lm.block_size

    def refresh(self, ids: torch.Tensor, attention_mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Full forward for the block [lo, hi): denoising logits (B, L, V); keeps the other positions' keys/values."""
        if self.mode == "block":
            return self._refresh_block(ids, attention_mask, lo, hi)
        L = ids.shape[1]
        start = max(lo - int(self.lm.shift), 0)
        end = L if self.mode == "prefix" else hi
        logits, cache = self._kv_call(ids.to(self.lm.device), attention_mask.to(self.lm.device), None, None)
        keep = torch.cat([torch.arange(start), torch.arange(end, L)]).to(self.lm.device)
        self.kept = _KeptKV([layer.keys.index_select(-2, keep) for layer in cache.layers],
                           [layer.values.index_select(-2, keep) for layer in cache.layers])
        am = attention_mask.to(self.lm.device).bool()
        self.key_mask = torch.cat([am[:, keep], am[:, start:end]], 1)
        self.window, self.lo = (start, end), lo
        return self.lm.align_logits(logits)

    def _refresh_block(self, ids: torch.Tensor, attention_mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Block mode: compute [kept, hi) on top of the kept keys/values (the blocks finished since the last
        refresh and the new block), keep everything before the new block's start. Logits outside are 0."""
        L, start = ids.shape[1], hi - self._block_size()
        begin = 0 if self.kept is None else self.kept.keys[0].shape[-2]
        am = attention_mask.to(self.lm.device).bool()
        self.lm.state.window = (begin, hi)
        if self.kept is None:
            logits, cache = self._kv_call(ids[:, :hi].to(self.lm.device), am[:, :hi], None, None)
        else:
            cache = _RecordingKV(self.kept)
            mask = self._window_mask(am, begin, hi)
            positions = torch.arange(begin, hi, device=self.lm.device)[None].expand(ids.shape[0], -1)
            logits, _ = self._kv_call(ids[:, begin:hi].to(self.lm.device), mask, positions, cache)
        self.kept = _KeptKV([layer.keys[..., :start, :] for layer in cache.layers],
                            [layer.values[..., :start, :] for layer in cache.layers])
        self.key_mask = am[:, :hi]
        self.window, self.lo = (start, hi), lo
        out = torch.zeros(ids.shape[0], L, logits.shape[-1], dtype=logits.dtype, device=logits.device)
        out[:, begin:hi] = logits
        return out

    def _window_mask(self, am: torch.Tensor, begin: int, hi: int) -> torch.Tensor:
        """(B, 1, hi - begin, hi) bool for queries [begin, hi) over keys [0, hi): the model's own block-causal
        structure restricted to real keys (queries always see themselves, as the loader's mask)."""
        from ..models.llada2 import block_mask

        return block_mask(am[:, :hi].long(), hi, self._block_size(), am.device)[:, :, begin:hi]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Denoising logits (B, end - lo, V) of positions [lo, end) from a forward of the window only."""
        start, end = self.window
        B = ids.shape[0]
        positions = torch.arange(start, end, device=self.lm.device)[None].expand(B, -1)
        assert self.key_mask is not None, "a cached step follows a refresh"
        mask = self.key_mask[:, None, None, :].expand(-1, 1, end - start, -1)
        logits, _ = self._kv_call(ids[:, start:end].to(self.lm.device), mask, positions, self.kept)
        if self.mode == "block":  # the window starts at the block start, which the prompt may fill partly
            return logits[:, self.lo - start:]
        if self.lm.shift:
            logits = torch.cat([logits[:, :1], logits], 1) if start == self.lo else logits
            logits = logits[:, :-1]
        return logits

