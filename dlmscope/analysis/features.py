"""Per-feature statistics and examples for the explorer, precomputed into a compact store.

The store is a folder: `manifest.json` (model, SAE, hook, counts, vocabulary strings, summary) and
`store.safetensors` (the evaluated tokens and masks, every non-zero latent activation sorted by
feature with offsets, per-feature statistics, top/bottom logit token ids). The app only slices
these arrays, so every page opens fast even for thousands of latents.

Activations come from held-out text corrupted like DLM-Scope's training data (t ~ U[0.05, 0.5],
first token kept), so masked and visible firing rates can be compared. Logit effects are
W_dec[f] scaled by the final RMSNorm weight, times the unembedding (the norm's per-token scale is
ignored, as usual for direct logit attribution).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..diffusion.noise import corrupt
from ..errors import DLMScopeError
from ..hooks import run_with_cache
from ..models.base import LoadedModel
from .splice import check_sae_matches

STORE_VERSION = 1


@torch.no_grad()
def build_feature_store(lm: LoadedModel, sae, rows: torch.Tensor, out: str | Path, *, n_seqs: int = 128,
                        batch_size: int = 16, t_range: tuple[float, float] = (0.05, 0.5), seed: int = 0,
                        n_logits: int = 10, sae_name: str = "") -> Path:
    """Encode held-out text through `sae` and write the explorer's store atomically."""
    from safetensors.torch import save_file

    hook = check_sae_matches(lm, sae)
    rows = rows[:n_seqs]
    if rows.shape[0] == 0:
        raise DLMScopeError("no held-out rows to build the feature store from")
    gen = torch.Generator().manual_seed(seed)
    S, L = rows.shape
    xt_all, masked_all = rows.clone(), torch.zeros_like(rows, dtype=torch.bool)
    feats, flat_pos, vals = [], [], []
    for start in range(0, S, batch_size):
        x0 = rows[start:start + batch_size]
        if lm.is_diffusion:
            lo, hi = t_range
            t = lo + (hi - lo) * torch.rand(x0.shape[0], generator=gen)
            c = corrupt(x0, lm.mask_id, t, eps=0.0, keep_first=True, generator=gen)
            xt_all[start:start + batch_size], masked_all[start:start + batch_size] = c.xt, c.mask
        acts = run_with_cache(lm, xt_all[start:start + batch_size].to(lm.device), [hook])[hook].float()
        values, indices = sae.encode_topk(acts.flatten(0, 1))
        keep = values > 0
        base = start * L
        pos = (torch.arange(values.shape[0], device=values.device)[:, None] + base).expand_as(indices)
        feats.append(indices[keep].cpu())
        flat_pos.append(pos[keep].cpu())
        vals.append(values[keep].cpu())
    feat, pos, val = torch.cat(feats), torch.cat(flat_pos), torch.cat(vals)
    order = torch.argsort(feat * (S * L) + pos)  # grouped by feature, then position
    feat, pos, val = feat[order], pos[order], val[order]
    n = sae.cfg.n_latents
    counts = torch.bincount(feat, minlength=n)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    masked_flat = masked_all.flatten()
    n_masked, n_visible = int(masked_flat.sum()), int((~masked_flat).sum())
    fired_masked = torch.bincount(feat[masked_flat[pos]], minlength=n)
    stats = {
        "density": counts.float() / (S * L),
        "max_act": torch.zeros(n).scatter_reduce(0, feat, val, "amax", include_self=True),
        "mean_act": torch.zeros(n).index_add_(0, feat, val) / counts.clamp_min(1),
        "masked_rate": fired_masked.float() / max(1, n_masked),
        "visible_rate": (counts - fired_masked).float() / max(1, n_visible),
    }
    W_U = lm.module.get_output_embeddings().weight.detach().float().cpu()
    norm = getattr(getattr(lm.module, "model", None), "norm", None)
    direction = sae.W_dec.detach().float().cpu() * (norm.weight.detach().float().cpu() if norm is not None else 1.0)
    logit_effect = direction @ W_U.t()
    top_logits = logit_effect.topk(n_logits, dim=1)
    bottom_logits = (-logit_effect).topk(n_logits, dim=1)
    vocab = [lm.tokenizer.decode([i]) for i in range(lm.vocab_size)] if lm.tokenizer is not None else \
        [str(i) for i in range(lm.vocab_size)]
    tensors = {"tokens": rows, "masked": masked_all.to(torch.uint8), "feature_offsets": offsets, "positions": pos,
               "values": val, "top_logit_ids": top_logits.indices, "top_logit_values": top_logits.values,
               "bottom_logit_ids": bottom_logits.indices, "bottom_logit_values": -bottom_logits.values,
               **{f"stat.{k}": v for k, v in stats.items()}}
    manifest = {"version": STORE_VERSION, "model": lm.name, "sae": sae_name, "hook": hook, "n_latents": n,
                "k": sae.cfg.k, "n_seqs": S, "context_length": L, "n_masked": n_masked, "n_visible": n_visible,
                "t_range": list(t_range), "vocab": vocab, "mask_id": lm.mask_id,
                "dead_fraction": float((counts == 0).float().mean()), "l0": float(counts.sum() / (S * L))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "store.safetensors"))
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class FeatureStore:
    """Read side of the store: cheap slices per feature."""

    manifest: dict
    t: dict[str, torch.Tensor]

    @classmethod
    def open(cls, folder: str | Path) -> "FeatureStore":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "manifest.json").is_file() or not (folder / "store.safetensors").is_file():
            raise DLMScopeError(f"{str(folder)!r} is not a feature store (build one with `dlmscope features build`)")
        try:
            return cls(json.loads((folder / "manifest.json").read_text()), load_file(str(folder / "store.safetensors")))
        except Exception as e:
            raise DLMScopeError(f"feature store {str(folder)!r} is corrupt: {e}") from None

    @property
    def n_latents(self) -> int:
        return int(self.manifest["n_latents"])

    def check_feature(self, f: int) -> None:
        if not 0 <= f < self.n_latents:
            raise DLMScopeError(f"feature {f} out of range: this store has latents 0..{self.n_latents - 1}")

    def stats(self) -> dict[str, torch.Tensor]:
        return {k.split(".", 1)[1]: v for k, v in self.t.items() if k.startswith("stat.")}

    def activations(self, f: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat positions, values) where feature f fired."""
        self.check_feature(f)
        lo, hi = int(self.t["feature_offsets"][f]), int(self.t["feature_offsets"][f + 1])
        return self.t["positions"][lo:hi], self.t["values"][lo:hi]

    def example(self, flat_pos: int, f: int, context: int = 5) -> dict:
        """Tokens around one position (+-context) with the feature's activations and mask flags."""
        L = int(self.manifest["context_length"])
        s, p = divmod(int(flat_pos), L)
        lo, hi = max(0, p - context), min(L, p + context + 1)
        pos, val = self.activations(f)
        in_row = (pos >= s * L + lo) & (pos < s * L + hi)
        acts = torch.zeros(hi - lo)
        acts[(pos[in_row] - s * L - lo).long()] = val[in_row]
        vocab = self.manifest["vocab"]
        return {"tokens": [vocab[i] for i in self.t["tokens"][s, lo:hi].tolist()], "acts": acts.tolist(),
                "masked": self.t["masked"][s, lo:hi].bool().tolist(), "center": p - lo}

    def top_examples(self, f: int, n: int = 10) -> list[dict]:
        pos, val = self.activations(f)
        order = val.argsort(descending=True)[:n]
        return [{**self.example(int(pos[i]), f), "value": float(val[i])} for i in order]

    def quantile_groups(self, f: int, groups: int = 10, per_group: int = 3) -> list[dict]:
        """Examples from 10 equal-count slices of the feature's non-zero activations, lowest first."""
        pos, val = self.activations(f)
        if val.numel() == 0:
            return []
        order = val.argsort()
        out = []
        for chunk in order.tensor_split(min(groups, val.numel())):
            out.append({"low": float(val[chunk].min()), "high": float(val[chunk].max()),
                        "examples": [self.example(int(pos[i]), f) for i in chunk[-per_group:]]})
        return out

    def logits(self, f: int) -> dict:
        self.check_feature(f)
        vocab = self.manifest["vocab"]
        return {side: [(vocab[int(i)], float(v)) for i, v in zip(self.t[f"{side}_logit_ids"][f], self.t[f"{side}_logit_values"][f])]
                for side in ("top", "bottom")}

    def top_tokens(self, f: int, n: int = 5) -> list[str]:
        return [e["tokens"][e["center"]] for e in self.top_examples(f, n)]
