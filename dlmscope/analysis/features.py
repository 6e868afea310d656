"""Per-feature statistics and examples for the explorer, precomputed into a compact store.

The store is a folder: `manifest.json` (model, SAE, hook, counts, vocabulary strings, SAE summary)
and `store.<digest>.safetensors` (the evaluated tokens and mask flags; every non-zero latent activation,
grouped by feature and sorted by value within a feature, with offsets; per-feature statistics,
activation histograms, top tokens and top/bottom logit tokens). Pages only slice these arrays, so
they open in milliseconds even for thousands of latents.

Verified on open: the manifest carries the arrays file's sha256 and a checksum of itself, and the arrays'
shapes, offsets, positions, token ids and finiteness are checked, so a flipped bit or an edited value is one
`DLMScopeError` line (the explorer shows it as a page error). A rebuild touches only the store's own files:
the new arrays file (content-addressed, so it never overwrites the one the current manifest names) is moved
in, then the manifest is replaced atomically, then the old arrays file is removed. A reader sees the old or
the new store, and anything else in the folder (notes, a splice.json) stays.

Activations come from held-out text corrupted like DLM-Scope's training data: t ~ U[0.05, 0.5] per
sequence, each position masked with probability t, the first (BOS) token kept; the masked positions
are recorded so masked and visible firing rates can be compared. Causal models are encoded
uncorrupted. Latents are the SAE's own `encode` (all latents, then its top-k or threshold).

Logit effects (direct logit attribution): W_dec[f] / input_scale, times the final RMSNorm weight,
times W_U (the unembedding). The norm's weight is included because it multiplies every residual
direction elementwise before W_U; the norm's per-token 1/rms scale is not (it depends on the token
and only rescales all logits together), as usual for direct logit attribution.

FVU is the textbook sum |x - x_hat|^2 / sum |x - mean x|^2 over all encoded tokens (and separately
over masked and visible positions).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import checks
from ..diffusion.noise import corrupt
from ..errors import DLMScopeError
from ..hooks import run_with_cache
from ..models.base import LoadedModel
from .splice import check_sae_matches

STORE_VERSION = 3
MANIFEST, LEGACY_ARRAYS = "manifest.json", "store.safetensors"


@dataclass
class FeatureStoreConfig:
    """What `dlmscope features build` encodes and keeps."""

    n_seqs: int | None = None
    """Held-out sequences to encode (None: all of them)."""
    context_length: int = 128
    """Tokens per held-out sequence."""
    batch_size: int = 16
    """Sequences per forward pass."""
    t_low: float = 0.05
    """Lowest mask ratio (DLM-Scope: 0.05)."""
    t_high: float = 0.5
    """Highest mask ratio (DLM-Scope: 0.5)."""
    seed: int = 0
    """Seed of the mask draws."""
    n_logits: int = 10
    """Top and bottom logit tokens kept per feature."""
    n_bins: int = 40
    """Activation histogram bins per feature (over [0, max activation])."""
    n_top_tokens: int = 5
    """Distinct tokens kept per feature from its top activations (the feature list searches them)."""

    def __post_init__(self) -> None:
        if self.n_seqs is not None:
            checks.positive("n_seqs", self.n_seqs)
        for name in ("context_length", "batch_size", "n_logits", "n_bins", "n_top_tokens"):
            checks.positive(name, getattr(self, name))
        checks.number("t_low", self.t_low, 0, 1)
        checks.number("t_high", self.t_high, self.t_low, 1)
        checks.seed("seed", self.seed)


class _FVU:
    """Streaming textbook FVU over a subset of tokens."""

    def __init__(self):
        self.sse, self.sum_sq, self.n, self.sum = 0.0, 0.0, 0, None

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        x, x_hat = x.double(), x_hat.double()
        self.sse += float((x - x_hat).pow(2).sum())
        self.sum_sq += float(x.pow(2).sum())
        self.sum = x.sum(0) if self.sum is None else self.sum + x.sum(0)
        self.n += x.shape[0]

    def value(self) -> float | None:
        if self.n == 0:
            return None
        total = self.sum_sq - float(self.sum.pow(2).sum()) / self.n
        return self.sse / max(total, 1e-30)


def _vocab_strings(lm: LoadedModel) -> list[str]:
    tok = lm.tokenizer
    if tok is None:
        return [str(i) for i in range(lm.vocab_size)]
    out = []
    for i in range(lm.vocab_size):
        s = tok.decode([i])  # partial UTF-8 bytes decode to U+FFFD: show the raw token instead
        out.append(s if s and "\ufffd" not in s else str(tok.convert_ids_to_tokens(i)))
    return out


def _old_manifest(folder: Path) -> dict | None:
    """The manifest of the feature store (any version) in `folder`, or None when it holds none."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("version"), int) else None


def check_store_target(out: str | Path) -> Path:
    """Refuse, before any work, an `out` that is not absent, an empty folder or an existing feature store
    (whose own files are then replaced; nothing else in it is touched), or whose parent cannot be written."""
    out = Path(out).expanduser()
    allowed = "give a folder that is absent, empty or an existing feature store"
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise DLMScopeError(f"feature store folder {str(out)!r} exists and is not a folder; {allowed}")
        if any(out.iterdir()) and _old_manifest(out) is None:
            raise DLMScopeError(f"feature store folder {str(out)!r} is a non-empty folder that is not a feature "
                                f"store; {allowed}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"))
    except OSError as e:
        raise DLMScopeError(f"cannot write the feature store {str(out)!r}: {e.strerror or e}") from None
    return out


def _old_arrays(folder: Path, manifest: dict | None) -> list[Path]:
    """The arrays files an existing store's manifest names (ours to replace); nothing else in the folder."""
    if manifest is None:
        return []
    if manifest.get("version", 0) < 3:
        return [folder / LEGACY_ARRAYS]
    name = (manifest.get("arrays") or {}).get("file")
    if isinstance(name, str) and name == Path(name).name and name.endswith(".safetensors"):  # a name, no path
        return [folder / name]
    return []


def _write_folder(out: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> Path:
    """Write the arrays in a fresh temporary folder beside `out`, then swap the store's own files in (module
    docstring): a new store is renamed into place whole; an existing one keeps every file it did not write."""
    from safetensors.torch import save as to_bytes

    from ..io_utils import atomic_write_text, json_sha256

    out.parent.mkdir(parents=True, exist_ok=True)
    raw = to_bytes({k: v.contiguous() for k, v in tensors.items()})
    digest = hashlib.sha256(raw).hexdigest()
    arrays = f"store.{digest[:16]}.safetensors"
    body = {**manifest, "arrays": {"file": arrays, "sha256": digest}}
    text = json.dumps({**body, "sha256": json_sha256(body)})
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        (tmp / arrays).write_bytes(raw)
        if not out.exists():
            (tmp / MANIFEST).write_text(text)
            os.replace(tmp, out)
            return out
        stale = [p for p in _old_arrays(out, _old_manifest(out)) if p.name != arrays]
        os.replace(tmp / arrays, out / arrays)
        atomic_write_text(out / MANIFEST, text)
        for p in stale:
            p.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@torch.no_grad()
def encoded_batches(lm: LoadedModel, sae, hook: str, rows: torch.Tensor, cfg: FeatureStoreConfig):
    """The store's pass over `rows`: DLM-Scope masking (diffusion models), activations at `hook`, latents.

    Yields (first row, masked (B, L), activations (B*L, d), latents (B*L, n_latents)) per `cfg.batch_size` rows.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    for start in range(0, rows.shape[0], cfg.batch_size):
        xt = x0 = rows[start:start + cfg.batch_size]
        masked = torch.zeros_like(x0, dtype=torch.bool)
        if lm.is_diffusion:
            t = cfg.t_low + (cfg.t_high - cfg.t_low) * torch.rand(x0.shape[0], generator=gen)
            c = corrupt(x0, lm.require_mask_id(), t, eps=0.0, keep_first=True, generator=gen)
            xt, masked = c.xt, c.mask
        acts = run_with_cache(lm, xt.to(lm.device), [hook], clean=x0)[hook].flatten(0, 1).to(sae.device, torch.float32)
        yield start, masked, acts, sae.encode(acts)


@torch.no_grad()
def build_feature_store(lm: LoadedModel, sae, rows: torch.Tensor, out: str | Path,
                        cfg: FeatureStoreConfig = FeatureStoreConfig(), sae_name: str = "", model_ref: str = "") -> Path:
    """Encode held-out `rows` (S, L) through `sae` at its hook and write the explorer's store to `out`.

    `sae_name` and `model_ref` (name or folder; default the model's name) are how the app reloads them.
    """
    t_start = time.perf_counter()
    out = check_store_target(out)
    hook = check_sae_matches(lm, sae)
    rows = rows[: cfg.n_seqs] if cfg.n_seqs is not None else rows
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise DLMScopeError(f"no held-out tokens to build the feature store from (rows of shape {tuple(rows.shape)})")
    if int(rows.max()) >= lm.vocab_size:
        raise DLMScopeError(f"token id {int(rows.max())} is outside {lm.name}'s vocabulary of {lm.vocab_size}")
    S, L = rows.shape
    masked_all = torch.zeros(S, L, dtype=torch.bool)
    feats, flat_pos, vals = [], [], []
    fvus = {"all": _FVU(), "masked": _FVU(), "visible": _FVU()}
    for start, masked, acts, dense in encoded_batches(lm, sae, hook, rows, cfg):
        masked_all[start:start + masked.shape[0]] = masked
        recon = sae.decode(dense)
        m = masked.flatten().to(acts.device)
        fvus["all"].add(acts, recon)
        fvus["masked"].add(acts[m], recon[m])
        fvus["visible"].add(acts[~m], recon[~m])
        tok, f = (dense > 0).nonzero(as_tuple=True)
        feats.append(f.cpu())
        flat_pos.append((tok + start * L).cpu())
        vals.append(dense[tok, f].cpu())
    feat, pos, val = torch.cat(feats), torch.cat(flat_pos), torch.cat(vals)
    # group by feature, largest activation first within a feature (two stable sorts)
    order = torch.sort(val, descending=True, stable=True).indices
    order = order[torch.sort(feat[order], stable=True).indices]
    feat, pos, val = feat[order], pos[order], val[order]

    n = sae.cfg.n_latents
    counts = torch.bincount(feat, minlength=n)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    masked_flat = masked_all.flatten()
    n_masked, n_visible = int(masked_flat.sum()), int((~masked_flat).sum())
    fired_masked = torch.bincount(feat[masked_flat[pos]], minlength=n)
    max_act = torch.zeros(n).scatter_reduce(0, feat, val, "amax", include_self=True)
    stats = {
        "count": counts,
        "density": counts.double() / (S * L),
        "max_act": max_act,
        "mean_act": torch.zeros(n, dtype=torch.float64).index_add_(0, feat, val.double()) / counts.clamp_min(1),
        "masked_rate": fired_masked.double() / max(1, n_masked),
        "visible_rate": (counts - fired_masked).double() / max(1, n_visible),
    }
    bins = (val / max_act[feat].clamp_min(1e-30) * cfg.n_bins).long().clamp_(0, cfg.n_bins - 1)
    hist = torch.bincount(feat * cfg.n_bins + bins, minlength=n * cfg.n_bins).view(n, cfg.n_bins)

    top_tokens = torch.full((n, cfg.n_top_tokens), -1, dtype=torch.long)
    flat_tokens = rows.flatten()
    for f in torch.nonzero(counts).flatten().tolist():
        lo = int(offsets[f])
        seen = list(dict.fromkeys(flat_tokens[pos[lo:min(int(offsets[f + 1]), lo + 64)]].tolist()))[:cfg.n_top_tokens]
        top_tokens[f, :len(seen)] = torch.tensor(seen)

    logit_effect = lm.direct_logits(sae.W_dec.detach().float().cpu() / sae.input_scale.float().cpu())
    n_logits = min(cfg.n_logits, lm.vocab_size)
    top = logit_effect.topk(n_logits, dim=1)
    bottom = logit_effect.topk(n_logits, dim=1, largest=False)

    tensors = {"tokens": rows.to(torch.int32), "masked": masked_all.to(torch.uint8),
               "feature_offsets": offsets, "positions": pos.to(torch.int64), "values": val.float(),
               "hist": hist.to(torch.int32), "top_tokens": top_tokens.to(torch.int32),
               "top_logit_ids": top.indices.to(torch.int32), "top_logit_values": top.values,
               "bottom_logit_ids": bottom.indices.to(torch.int32), "bottom_logit_values": bottom.values,
               **{f"stat.{k}": v.float() if v.is_floating_point() else v for k, v in stats.items()}}
    manifest = {
        "version": STORE_VERSION, "model": lm.name, "model_ref": model_ref or lm.name, "sae": sae_name, "hook": hook,
        "diffusion": lm.is_diffusion,
        "n_latents": n, "k": sae.cfg.k, "architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in,
        "sae_model": sae.cfg.model_name, "n_seqs": S, "context_length": L, "n_tokens": S * L,
        "n_masked": n_masked, "n_visible": n_visible, "config": asdict(cfg), "mask_id": lm.mask_id,
        "vocab": _vocab_strings(lm),
        "logit_lens": "W_dec/input_scale * final_norm.weight @ W_U" if lm.final_norm_weight() is not None
        else "W_dec/input_scale @ W_U (no final norm found)",
        "l0": float(counts.sum()) / (S * L), "dead_fraction": float((counts == 0).double().mean()),
        "fvu": fvus["all"].value(), "fvu_masked": fvus["masked"].value(), "fvu_visible": fvus["visible"].value(),
        "build_seconds": time.perf_counter() - t_start,
    }
    return _write_folder(out, tensors, manifest)


ARRAY_SHAPES = {"tokens": ("S", "L"), "masked": ("S", "L"), "feature_offsets": ("n+1",), "values": ("nnz",),
                "positions": ("nnz",), "hist": ("n", None), "top_tokens": ("n", None), "top_logit_ids": ("n", None),
                "top_logit_values": ("n", None), "bottom_logit_ids": ("n", None), "bottom_logit_values": ("n", None),
                **{f"stat.{k}": ("n",) for k in ("count", "density", "max_act", "mean_act", "masked_rate",
                                                  "visible_rate")}}
"""The arrays a store holds and their shapes (S sequences of L tokens, n latents, nnz non-zero activations)."""


def _check_arrays(manifest: dict, t: dict[str, torch.Tensor]) -> None:
    """Raise ValueError / KeyError unless the arrays agree with the manifest and each other: what every page
    slices (offsets, positions, token and vocabulary ids) stays in range, and every float is finite."""
    sizes: dict[str | None, int | None] = {
        "S": int(manifest["n_seqs"]), "L": int(manifest["context_length"]), "n": int(manifest["n_latents"]),
        "n+1": int(manifest["n_latents"]) + 1, "nnz": t["values"].numel(), None: None}
    n_tokens = int(manifest["n_seqs"]) * int(manifest["context_length"])
    for name, dims in ARRAY_SHAPES.items():
        want = [sizes[d] for d in dims]
        got = list(t[name].shape)
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            raise ValueError(f"array {name} has shape {got}; expected {[w if w is not None else '*' for w in want]}")
    offsets, vocab = t["feature_offsets"], len(manifest["vocab"])
    if int(offsets[0]) != 0 or int(offsets[-1]) != sizes["nnz"] or bool((offsets.diff() < 0).any()):
        raise ValueError("feature_offsets are not non-decreasing from 0 to the number of activations")
    if t["values"].numel() and not 0 <= int(t["positions"].min()) <= int(t["positions"].max()) < n_tokens:
        raise ValueError("an activation position lies outside the encoded tokens")
    for name in ("tokens", "top_logit_ids", "bottom_logit_ids", "top_tokens"):
        ids = t[name]
        low = -1 if name == "top_tokens" else 0  # -1 pads a feature's top tokens
        if ids.numel() and not low <= int(ids.min()) <= int(ids.max()) < vocab:
            raise ValueError(f"array {name} holds ids outside the stored vocabulary of {vocab}")
    bad = checks.non_finite(t)
    if bad is not None:
        raise ValueError(f"array {bad}")


@dataclass
class FeatureStore:
    """Read side of the store: cheap slices per feature."""

    manifest: dict
    t: dict[str, torch.Tensor]

    @classmethod
    def open(cls, folder: str | Path) -> "FeatureStore":
        """Read and verify a store (module docstring): damage of any kind is one line naming the folder."""
        from safetensors.torch import load as load_bytes

        from ..io_utils import json_sha256

        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise DLMScopeError(f"{str(folder)!r} is not a feature store (build one with `dlmscope features build`)")
        rebuild = "rebuild it with `dlmscope features build`"
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            version = manifest.get("version")
        except (OSError, ValueError, AttributeError) as e:
            raise DLMScopeError(f"feature store {str(folder)!r} is unreadable ({e}); {rebuild}") from None
        if version != STORE_VERSION:
            raise DLMScopeError(f"feature store {str(folder)!r} has version {version}; this dlmscope reads version "
                                f"{STORE_VERSION} ({rebuild})")
        body = {k: v for k, v in manifest.items() if k != "sha256"}
        files = _old_arrays(folder, manifest)
        if manifest.get("sha256") != json_sha256(body) or not files:
            raise DLMScopeError(f"feature store {str(folder / MANIFEST)!r} is damaged (checksum mismatch); {rebuild}")
        try:
            raw = files[0].read_bytes()
        except OSError as e:
            raise DLMScopeError(f"feature store {str(files[0])!r} is unreadable: {e.strerror or e}; "
                                f"{rebuild}") from None
        if hashlib.sha256(raw).hexdigest() != manifest["arrays"].get("sha256"):
            raise DLMScopeError(f"feature store {str(files[0])!r} is damaged (checksum mismatch); {rebuild}")
        try:
            arrays = load_bytes(raw)
            _check_arrays(manifest, arrays)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise DLMScopeError(f"feature store {str(folder)!r} is inconsistent: {str(e).splitlines()[0]}; "
                                f"{rebuild}") from None
        return cls(manifest, arrays)

    @property
    def n_latents(self) -> int:
        return int(self.manifest["n_latents"])

    @property
    def empty(self) -> bool:
        """True when no latent fired on the encoded text (nothing to browse)."""
        return self.t["values"].numel() == 0

    def check_feature(self, f: int) -> int:
        if not 0 <= f < self.n_latents:
            raise DLMScopeError(f"feature {f} out of range: this store has latents 0..{self.n_latents - 1}")
        return f

    def check_matches(self, sae, model_name: str | None = None) -> None:
        """The store was built for this SAE (hook, size) and model."""
        m = self.manifest
        if sae.cfg.hook_name != m["hook"] or sae.cfg.n_latents != m["n_latents"] or sae.cfg.d_in != m["d_in"]:
            raise DLMScopeError(f"the store was built for an SAE at {m['hook']} with {m['n_latents']} latents, not "
                                f"{sae.cfg.hook_name} with {sae.cfg.n_latents} (rebuild it for this SAE)")
        if model_name is not None and model_name != m["model"]:
            raise DLMScopeError(f"the store was built on model {m['model']!r}, not {model_name!r}")

    def stats(self) -> dict[str, torch.Tensor]:
        return {k.split(".", 1)[1]: v for k, v in self.t.items() if k.startswith("stat.")}

    def tokens_of(self, ids) -> list[str]:
        vocab = self.manifest["vocab"]
        return [vocab[int(i)] for i in ids if int(i) >= 0]

    def activations(self, f: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat positions, values) where feature f fired, largest value first."""
        self.check_feature(f)
        lo, hi = int(self.t["feature_offsets"][f]), int(self.t["feature_offsets"][f + 1])
        return self.t["positions"][lo:hi], self.t["values"][lo:hi]

    def _dense(self, f: int) -> torch.Tensor:
        pos, val = self.activations(f)
        return torch.zeros(self.t["tokens"].numel()).index_put_((pos,), val)

    def _example(self, dense: torch.Tensor, flat_pos: int, context: int) -> dict:
        L = int(self.manifest["context_length"])
        s, p = divmod(int(flat_pos), L)
        lo, hi = max(0, p - context), min(L, p + context + 1)
        return {"tokens": self.tokens_of(self.t["tokens"][s, lo:hi]), "acts": dense[s * L + lo:s * L + hi].tolist(),
                "masked": self.t["masked"][s, lo:hi].bool().tolist(), "center": p - lo,
                "value": float(dense[flat_pos]), "seq": s, "pos": p}

    def top_examples(self, f: int, n: int = 10, context: int = 5) -> list[dict]:
        """The n largest activations, each with +-context tokens, their activations and mask flags."""
        pos, _ = self.activations(f)
        dense = self._dense(f)
        return [self._example(dense, int(p), context) for p in pos[:n]]

    def quantile_groups(self, f: int, groups: int = 10, per_group: int = 3, context: int = 5) -> list[dict]:
        """Equal-count slices of the feature's non-zero activations, highest first, with evenly spaced examples."""
        pos, val = self.activations(f)
        if val.numel() == 0:
            return []
        dense = self._dense(f)
        out = []
        for chunk in torch.arange(val.numel()).tensor_split(min(groups, val.numel())):
            picks = chunk[torch.linspace(0, len(chunk) - 1, min(per_group, len(chunk))).round().long()].unique()
            out.append({"low": float(val[chunk[-1]]), "high": float(val[chunk[0]]), "count": len(chunk),
                        "examples": [self._example(dense, int(pos[i]), context) for i in picks]})
        return out

    def histogram(self, f: int) -> tuple[list[float], list[int]]:
        """(bin centres, counts) of the feature's non-zero activations."""
        self.check_feature(f)
        counts = self.t["hist"][f]
        width = float(self.t["stat.max_act"][f]) / counts.numel()
        return [(i + 0.5) * width for i in range(counts.numel())], counts.tolist()

    def logits(self, f: int) -> dict[str, list[tuple[str, float]]]:
        """Top and bottom tokens of the feature's direct logit effect."""
        self.check_feature(f)
        return {side: list(zip(self.tokens_of(self.t[f"{side}_logit_ids"][f]), self.t[f"{side}_logit_values"][f].tolist()))
                for side in ("top", "bottom")}

    def top_tokens(self, f: int) -> list[str]:
        self.check_feature(f)
        return self.tokens_of(self.t["top_tokens"][f])
