"""LLaDA 2.1's editing sampler: block decoding that also rewrites tokens it has already committed.

Upstream (dllm `LLaDA21Sampler`, the 2.1 checkpoint's own `generate`), per block of the model (aligned to
position 0, the prompt's last block first), repeated: one forward of everything up to the block's end; the
block's masked positions are revealed as LLaDA 2.x does with a quota of `num_to_transfer` (every one above
`threshold` when that many are, else the best); and every generated position already placed in the block
whose predicted token differs from it with probability > `editing_threshold` is rewritten. A step that
starts with the block full counts as a post step; the block ends at the first such step that edits nothing,
or after `max_post_steps` of them. Upstream decodes one sequence at a time, and so does this sampler, row by
row, which lets prompts differ in length. Released 2.0 and 2.1 folders look alike (`llada2_moe`), so this
sampler is opt-in: `generate` runs LLaDA 2.x's non-editing block sampler (`diffusion.blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import checks
from ..errors import DLMScopeError
from ..models.base import ForwardState, LoadedModel
from .prompts import prepare_prompts
from .sampler import GenerateOutput
from .sampling import gumbel_argmax


@torch.no_grad()
def generate_editing(
    lm: LoadedModel,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int = 128,
    *,
    block_length: int | None = None,
    threshold: float = 0.95,
    editing_threshold: float = 0.9,
    max_post_steps: int = 16,
    num_to_transfer: int = 1,
    temperature: float = 0.0,
    eos_early_stop: bool = False,
    seed: int | None = None,
) -> GenerateOutput:
    """LLaDA 2.1 sampling with editing (token for token upstream's at temperature 0).

    `block_length` None is the model's `block_size` (32 for released folders). `eos_early_stop` stops a row
    after the first block that leaves its generation free of masks and holding an EOS (later positions stay
    masked). Temperature > 0 draws from the same distribution as upstream with other random numbers.
    Hooks see every forward; `lm.state` carries the step, block and mask. Returns left-padded prompts and
    right-padded generations (attention 0 where a row is shorter).
    """
    if not lm.block_size:
        raise DLMScopeError(f"{lm.name} ({lm.family}) is not a block-diffusion model; the editing sampler is "
                            "LLaDA 2.1's")
    checks.positive("max_new_tokens", max_new_tokens)
    checks.integer("max_post_steps", max_post_steps, 0)
    checks.positive("num_to_transfer", num_to_transfer)
    checks.number("threshold", threshold, 0, 1)
    checks.number("editing_threshold", editing_threshold, 0, 1)
    checks.number("temperature", temperature, 0)
    block = lm.block_size if block_length is None else checks.positive("block_length", block_length)
    mask_id = lm.require_mask_id()
    if eos_early_stop and lm.eos_id is None:
        raise DLMScopeError(f"eos_early_stop needs an EOS id; {lm.name} declares none (pass load_model(..., eos_id=N))")
    ids, attn = prepare_prompts(lm, prompts)
    rows = [row[a.bool()].tolist() for row, a in zip(ids, attn)]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    rule = _EditRule(lm, mask_id, block, threshold, editing_threshold, max_post_steps, num_to_transfer, temperature,
                     generator)
    saved = lm.block_size
    lm.block_size = block
    try:
        outs = [rule.row(prompt, max_new_tokens, eos_early_stop) for prompt in rows]
    finally:
        lm.block_size = saved
        lm.state = ForwardState()
    return _assemble(lm, rows, outs, ids.shape[1], rule.count)


class _EditRule:
    """One row's decoding; `count` sums the forwards over rows."""

    def __init__(self, lm: LoadedModel, mask_id: int, block: int, threshold: float, editing_threshold: float,
                 max_post_steps: int, num_to_transfer: int, temperature: float, generator: torch.Generator | None):
        self.lm, self.mask_id, self.block = lm, mask_id, block
        self.threshold, self.editing_threshold = threshold, editing_threshold
        self.max_post_steps, self.num_to_transfer = max_post_steps, num_to_transfer
        self.temperature, self.generator = temperature, generator
        self.count = 0

    def predict(self, x: torch.Tensor, step: int, blk: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, their probabilities) for the last block of `x` (1, end), the model's own block-causal view."""
        mask = x == self.mask_id
        self.lm.state = ForwardState(step, None, blk, mask, float(mask[:, P:].float().mean()))
        logits = self.lm.denoise_logits(x)[0, -self.block:].float()
        self.count += 1
        if self.temperature > 0:
            logits = logits / self.temperature
        probs = F.softmax(logits, dim=-1)
        tokens = gumbel_argmax(logits, 1.0, self.generator) if self.temperature > 0 else probs.argmax(-1)
        return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)

    def reveal(self, active: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """LLaDA 2.x's rule with a fixed quota: all above the threshold if enough, else the quota best."""
        transfer = torch.zeros_like(active)
        if not active.any():
            return transfer
        conf = prob.masked_fill(~active, float("-inf"))
        high = active & (conf > self.threshold)
        if int(high.sum()) >= self.num_to_transfer:
            return high
        transfer[torch.topk(conf, min(self.num_to_transfer, int(active.sum()))).indices] = True
        return transfer

    def row(self, prompt: list[int], max_new_tokens: int, eos_early_stop: bool) -> torch.Tensor:
        """The generated positions (a multiple of the block length minus the prompt's share) of one prompt."""
        B, P, device = self.block, len(prompt), self.lm.device
        total = -(-(P + max_new_tokens) // B) * B
        x = torch.full((1, total), self.mask_id, dtype=torch.long, device=device)
        x[0, :P] = torch.as_tensor(prompt, dtype=torch.long)
        step = 0
        for blk in range(P // B, total // B):
            lo, hi = blk * B, (blk + 1) * B
            protected = torch.arange(lo, hi, device=device) < P
            post = 0
            while True:
                old = x[0, lo:hi].clone()
                active = old == self.mask_id
                post += int(not active.any())
                if post > self.max_post_steps:
                    break
                tokens, prob = self.predict(x[:, :hi], step, blk, P)
                step += 1
                edit = ~active & ~protected & (prob > self.editing_threshold) & (tokens != old)
                change = self.reveal(active, prob) | edit
                x[0, lo:hi] = torch.where(change, tokens, old)
                if not active.any() and not edit.any():
                    break
            done = x[0, P:hi]
            if eos_early_stop:
                assert self.lm.eos_id is not None  # checked before sampling
                if not (done == self.mask_id).any() and (done == self.lm.eos_id).any():
                    break
        return x[0, P:].cpu()


def _assemble(lm: LoadedModel, rows: list[list[int]], outs: list[torch.Tensor], width: int,
              n_forwards: int) -> GenerateOutput:
    """Left-padded prompts (`width` wide) + right-padded generations, with the attention mask and texts."""
    pad = lm.pad_id if lm.pad_id is not None else lm.require_mask_id()
    G = max(len(o) for o in outs)
    seq = torch.full((len(rows), width + G), pad, dtype=torch.long)
    attn = torch.zeros_like(seq)
    for b, (prompt, gen) in enumerate(zip(rows, outs)):
        seq[b, width - len(prompt):width] = torch.as_tensor(prompt, dtype=torch.long)
        seq[b, width:width + len(gen)] = gen
        attn[b, width - len(prompt):width + len(gen)] = 1
    texts = None
    if lm.tokenizer is not None:
        cut = [o.tolist() for o in outs]
        texts = [lm.to_text(r[: r.index(lm.eos_id)] if lm.eos_id in r else r) for r in cut]
    return GenerateOutput(seq, attn, width, texts, [], n_forwards)
