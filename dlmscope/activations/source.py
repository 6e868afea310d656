"""Activation providers for SAE training, following DLM-Scope's protocol.

One forward per batch of packed text: the mask ratio t is drawn once per batch from a t-range,
the first token is never masked, and a position policy picks which tokens' activations are kept
(`mask`: masked positions, `unmask`: visible ones, `all`, or `clean`: no masking, the default for
autoregressive models). Every source batch is a pure function of (seed, rank, pass, index), so a
resumed run regenerates exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..diffusion.noise import check_t_range, corrupt
from ..errors import DLMScopeError
from ..hooks import run_with_cache
from ..models.base import LoadedModel

POLICIES = ("mask", "unmask", "all", "clean")
INFO_KEYS = ("token", "position", "doc", "t", "masked")


@dataclass
class ActivationBatch:
    """Activations per hook (N, d) and, per token: id, position, document id, t, was-masked."""

    acts: dict[str, torch.Tensor]
    info: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.info["token"].shape[0])


def default_policy(lm: LoadedModel) -> str:
    return "clean" if lm.causal else "mask"


class ActivationSource:
    """Batches of activations from one forward each over packed token rows."""

    def __init__(self, lm: LoadedModel, hooks: Sequence[str], rows: torch.Tensor, doc_ids: torch.Tensor | None = None,
                 *, policy: str | None = None, t_range: tuple[float, float] = (0.05, 0.5), seqs_per_batch: int = 16,
                 seed: int = 0, rank: int = 0, world: int = 1):
        self.lm, self.hooks = lm, list(hooks)
        for h in self.hooks:
            lm.site(h)
        self.policy = policy or default_policy(lm)
        if self.policy not in POLICIES:
            raise DLMScopeError(f"unknown position policy {self.policy!r}; allowed: {', '.join(POLICIES)}")
        if lm.causal and self.policy != "clean":
            raise DLMScopeError(f"policy {self.policy!r} needs a diffusion model; {lm.name} is autoregressive (use clean)")
        if self.policy != "clean":
            lm.require_mask_id()
        self.t_range = check_t_range(t_range)
        self.rows = rows[rank::world]
        self.doc_ids = (doc_ids if doc_ids is not None else torch.zeros_like(rows))[rank::world]
        if self.rows.shape[0] < seqs_per_batch:
            raise DLMScopeError(f"the dataset has {self.rows.shape[0]} rows for this process, fewer than one batch of "
                                f"{seqs_per_batch}; give more text or a smaller batch")
        self.seqs_per_batch, self.seed, self.rank = seqs_per_batch, seed, rank

    def __len__(self) -> int:
        """Batches per pass over the data."""
        return self.rows.shape[0] // self.seqs_per_batch

    def _generator(self, epoch: int, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, self.rank, epoch, index)) & 0x7FFFFFFF)

    @torch.no_grad()
    def batch(self, epoch: int, index: int) -> ActivationBatch:
        order = torch.randperm(self.rows.shape[0], generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        pick = order[index * self.seqs_per_batch:(index + 1) * self.seqs_per_batch]
        x0, docs = self.rows[pick], self.doc_ids[pick]
        B, L = x0.shape
        if self.policy == "clean":
            xt, masked, t = x0, torch.zeros_like(x0, dtype=torch.bool), torch.zeros(B)
        else:
            gen = self._generator(epoch, index)
            lo, hi = self.t_range
            t = torch.full((B,), lo + (hi - lo) * float(torch.rand(1, generator=gen)))
            c = corrupt(x0, self.lm.require_mask_id(), t, eps=0.0, keep_first=True, generator=gen)
            xt, masked = c.xt, c.mask
        keep = {"mask": masked, "unmask": ~masked, "all": torch.ones_like(masked),
                "clean": torch.ones_like(masked)}[self.policy]
        acts = run_with_cache(self.lm, xt, self.hooks, positions=keep.to(self.lm.device), clean=x0)
        info = {"token": x0[keep], "position": torch.arange(L).expand(B, L)[keep], "doc": docs[keep],
                "t": t[:, None].expand(B, L)[keep], "masked": masked[keep]}
        return ActivationBatch({h: a.float().cpu() for h, a in acts.items()}, info)


class PairedActivationSource:
    """The same batches run through several checkpoints: identical tokens, masks and positions for each
    (one `ActivationSource` per checkpoint, all with the same seed); each hook's activations are the
    checkpoints' concatenated along the feature axis (N, C * d), checkpoint order as given.

    Checkpoints must share tokenizer and width (checked by the caller, `analysis.stability.check_compatible`)."""

    def __init__(self, lms: Sequence[LoadedModel], hooks: Sequence[str], rows: torch.Tensor,
                 doc_ids: torch.Tensor | None = None, **kwargs):
        if len(lms) < 2:
            raise DLMScopeError(f"paired activations need at least two checkpoints; got {len(lms)}")
        self.sources = [ActivationSource(lm, hooks, rows, doc_ids, **kwargs) for lm in lms]
        first = self.sources[0]
        self.lm, self.hooks, self.policy, self.t_range = first.lm, first.hooks, first.policy, first.t_range
        self.seed, self.seqs_per_batch = first.seed, first.seqs_per_batch

    def __len__(self) -> int:
        return len(self.sources[0])

    def batch(self, epoch: int, index: int) -> ActivationBatch:
        batches = [s.batch(epoch, index) for s in self.sources]
        return ActivationBatch({h: torch.cat([b.acts[h] for b in batches], dim=1) for h in self.hooks}, batches[0].info)
