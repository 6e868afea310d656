"""SAE files: SAELens' on-disk format for ours, plus readers for DLM-Scope's and sparsify's releases.

SAELens layout: `cfg.json` (architecture, d_in, d_sae, k, dtype, device, apply_b_dec_to_input,
normalize_activations, metadata{model_name, hook_name, context_size, dataset_path, ...}),
`sae_weights.safetensors` (W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec) and
`sparsity.safetensors` (log10 feature density).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import DLMScopeError
from .model import SAEConfig, TopKSAE


def save_sae(sae: TopKSAE, folder: str | Path, density: torch.Tensor | None = None) -> Path:
    """Write `sae` (input scale folded in) atomically: a half-written folder never replaces a good one."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    sae = _folded_copy(sae)
    cfg = sae.cfg
    meta = {"model_name": None, "hook_name": None, "context_size": None, "dataset_path": None,
            "hf_hook_point_in": None, "prepend_bos": True, **cfg.metadata}
    cfg_json = {"architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.n_latents, "k": cfg.k,
                "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                "normalize_activations": "none", "reshape_activations": "none",
                "rescale_acts_by_decoder_norm": False, "metadata": meta}
    if cfg.architecture == "batchtopk":
        cfg_json["topk_threshold"] = float(sae.threshold)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        weights = {n: p.detach().float().contiguous().cpu() for n, p in
                   (("W_enc", sae.W_enc), ("b_enc", sae.b_enc), ("W_dec", sae.W_dec), ("b_dec", sae.b_dec))}
        save_file(weights, str(tmp / "sae_weights.safetensors"))
        if density is not None:
            save_file({"sparsity": torch.log10(density.float().clamp_min(1e-10)).cpu()}, str(tmp / "sparsity.safetensors"))
        (tmp / "cfg.json").write_text(json.dumps(cfg_json, indent=2))
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _folded_copy(sae: TopKSAE) -> TopKSAE:
    copy = TopKSAE(sae.cfg)
    copy.load_state_dict(sae.state_dict())
    copy.fold_input_scale()
    return copy.eval()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DLMScopeError(f"cannot read SAE config {str(path)!r}: {e}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # truncated or corrupt file
        raise DLMScopeError(f"cannot read SAE weights {str(path)!r}: {e}") from None


def _build(cfg: SAEConfig, W_enc, b_enc, W_dec, b_dec, threshold: float | None = None) -> TopKSAE:
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            target = getattr(sae, name)
            if tuple(value.shape) != tuple(target.shape):
                raise DLMScopeError(f"SAE weight {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value.float())
        if threshold is not None:
            sae.threshold.fill_(float(threshold))
    return sae.eval()


def load_sae_dir(path: str | Path, device: str | torch.device = "cpu") -> TopKSAE:
    """Load an SAE folder in SAELens/dlmscope, DLM-Scope (dictionary_learning Top-K) or sparsify format."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DLMScopeError(f"SAE folder {str(path)!r} does not exist")
    if (path / "sae_weights.safetensors").is_file():
        c = _read_json(path / "cfg.json")
        w = _read_safetensors(path / "sae_weights.safetensors")
        arch = c.get("architecture", "topk")
        cfg = SAEConfig(c["d_in"], c["d_sae"], c["k"], arch if arch in ("topk", "batchtopk") else "topk",
                        c.get("metadata") or {})
        sae = _build(cfg, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], c.get("topk_threshold"))
    elif (path / "ae.pt").is_file():  # dictionary_learning AutoEncoderTopK, as DLM-Scope released
        c = _read_json(path / "config.json")
        try:
            w = torch.load(path / "ae.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise DLMScopeError(f"cannot read SAE weights {str(path / 'ae.pt')!r}: {e}") from None
        trainer = c.get("trainer", c)
        k = int(w["k"]) if "k" in w else int(trainer["k"])
        W_enc = w["encoder.weight"]  # (n_latents, d_in)
        cfg = SAEConfig(W_enc.shape[1], W_enc.shape[0], k, "topk",
                        {"model_name": trainer.get("lm_name"), "hook_name": trainer.get("submodule_name"),
                         "layer": trainer.get("layer"), "source_format": "dictionary_learning"})
        # dictionary_learning encodes relu(encoder(x - b_dec)) and decodes decoder(f) + b_dec.
        sae = _build(cfg, W_enc.t(), w["encoder.bias"], w["decoder.weight"].t(), w["b_dec"])
    elif (path / "sae.safetensors").is_file():  # sparsify
        c = _read_json(path / "cfg.json")
        w = _read_safetensors(path / "sae.safetensors")
        W_enc = w["encoder.weight"]
        cfg = SAEConfig(W_enc.shape[1], W_enc.shape[0], int(c["k"]), "topk",
                        {"hook_name": c.get("hookpoint"), "source_format": "sparsify"})
        # sparsify encodes topk(relu(encoder(x - b_dec))) and decodes f @ W_dec + b_dec.
        sae = _build(cfg, W_enc.t(), w["encoder.bias"], w["W_dec"], w["b_dec"])
    else:
        raise DLMScopeError(f"{str(path)!r} holds no known SAE format (sae_weights.safetensors, ae.pt or sae.safetensors)")
    return sae.to(device)
