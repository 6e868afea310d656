"""SAE files: SAELens' on-disk format for ours, plus readers for DLM-Scope's and sparsify's releases.

SAELens v6 layout (what `sae_lens.SAE.load_from_disk` reads): `cfg.json` with `architecture`, `d_in`,
`d_sae`, `dtype`, `device`, `apply_b_dec_to_input`, `normalize_activations`, `reshape_activations`,
`metadata` {sae_lens_version, model_name, hook_name, context_size, dataset_path, ... our extras such as
masking_policy and t_range}, plus `k` and `rescale_acts_by_decoder_norm` for "topk";
`sae_weights.safetensors` with W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in);
`sparsity.safetensors` with `sparsity` = log10 feature density. Each architecture class names the
SAELens architecture it is saved as (`register_architecture(..., saved_as=)`) and adds its own entries
(`saelens_fields` / `load_saelens_fields`): SAELens has no inference "batchtopk" class, so BatchTopK and
Matryoshka SAEs are "jumprelu" with one threshold for every latent (`metadata.dlmscope_architecture` and
`k` record ours), transcoders "jumprelu_transcoder" / "jumprelu_skip_transcoder" (`d_out`,
`apply_b_dec_to_input` false, `W_skip` (d_out, d_in), `metadata.hook_name_out`). `saelens_state` /
`from_saelens_state` are the same conversion in memory (`dlmscope.to_sae_lens` / `from_sae_lens`).

Also read: DLM-Scope's release format, dictionary_learning's AutoEncoderTopK / BatchTopKSAE (`ae.pt`
state dict encoder.weight (n, d), encoder.bias, decoder.weight (d, n), b_dec, k, threshold; and
`config.json` {"trainer": {...}}), and sparsify's (`cfg.json` {k, num_latents, d_in, activation, ...} +
`sae.safetensors` encoder.weight (n, d), encoder.bias, W_dec (n, d), b_dec). Both encode
ReLU(W (x - b_dec) + b) then top-k, and decode f W_dec + b_dec, exactly our maths.

Every reader rejects non-finite weights and malformed configs with one line naming the file and key.
Our own SAEs carry `metadata.dlmscope_weights_sha256` (the weights file's checksum), verified on load,
so flipped bytes in a finite float do not load silently either.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import DLMScopeError
from .family import build_sae
from .model import ARCHITECTURES, SAE, SAELENS_READERS, SAEConfig

SAELENS_FORMAT_VERSION = "6.0.0"  # the SAELens config layout our cfg.json follows
CHECKSUM_KEY = "dlmscope_weights_sha256"


def saelens_state(sae: SAE) -> tuple[dict, dict[str, torch.Tensor]]:
    """SAELens' config dict and float32 CPU weights for `sae`, input scale folded in."""
    sae = _folded_copy(sae)
    cfg = sae.cfg
    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "model_name": None, "hook_name": None,
            "context_size": None, "dataset_path": None, "prepend_bos": True, **cfg.metadata}
    cfg_json = {"architecture": sae.saved_as, "d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": "float32",
                "device": "cpu", "apply_b_dec_to_input": sae.applies_b_dec_to_input, "normalize_activations": "none",
                "reshape_activations": "none", "metadata": meta}
    weights = {n: getattr(sae, n).detach().float().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    sae.saelens_fields(cfg_json, meta, weights)
    return cfg_json, {n: w.cpu() for n, w in weights.items()}


def save_sae(sae: SAE, folder: str | Path, density: torch.Tensor | None = None) -> Path:
    """Write `sae` in SAELens' format, input scale folded in, atomically.

    Files go to a temporary sibling folder that is renamed into place; an existing SAE at `folder` is
    moved aside first and deleted only after the new one is in place, so a crash never leaves a
    half-written folder under `folder`'s name. `density` (n_latents,) is the firing frequency.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    cfg_json, weights = saelens_state(sae)
    meta = cfg_json["metadata"]
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        save_file(weights, str(tmp / "sae_weights.safetensors"))
        meta[CHECKSUM_KEY] = hashlib.sha256((tmp / "sae_weights.safetensors").read_bytes()).hexdigest()
        if density is not None:
            save_file({"sparsity": torch.log10(density.detach().float().clamp_min(1e-10)).cpu()},
                      str(tmp / "sparsity.safetensors"))
        (tmp / "cfg.json").write_text(json.dumps(cfg_json, indent=2, default=str) + "\n")
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
            os.replace(folder, old / "sae")
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _folded_copy(sae: SAE) -> SAE:
    copy = build_sae(sae.cfg)
    copy.load_state_dict(sae.state_dict())
    copy.fold_input_scale()
    return copy.eval()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DLMScopeError(f"cannot read SAE config {str(path)!r}: {_first_line(e)}") from None
    if not isinstance(value, dict):
        raise DLMScopeError(f"SAE config {str(path)!r} is not a JSON object")
    return value


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # truncated or corrupt file
        raise DLMScopeError(f"cannot read SAE weights {str(path)!r}: {_first_line(e)}") from None


def _get(d: dict, key: str, path: Path | str):
    if key not in d:
        raise DLMScopeError(f"{str(path)!r} lacks {key!r}")
    return d[key]


def _matrix(d: dict, key: str, path: Path | str) -> torch.Tensor:
    value = _get(d, key, path)
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        raise DLMScopeError(f"{str(path)!r}: {key} must be a matrix, not {getattr(value, 'shape', type(value).__name__)}")
    return value


def _int(value, key: str, path: Path | str) -> int:
    """A config integer: a JSON int (or a one-element integer tensor in a state dict), nothing else."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DLMScopeError(f"{str(path)!r}: {key}={value!r} must be an integer")
    return value


def _dict(value, key: str, path: Path | str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DLMScopeError(f"{str(path)!r}: {key} must be a JSON object, not {type(value).__name__}")
    return value


def _build(cfg: SAEConfig, path: Path | str, W_enc, b_enc, W_dec, b_dec, threshold: float | None = None,
           fields: dict[str, torch.Tensor] | None = None) -> SAE:
    """An SAE of `cfg` with the given weights; `fields` holds its architecture's extra SAELens weights."""
    sae = build_sae(cfg)
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            target = getattr(sae, name)
            if tuple(value.shape) != tuple(target.shape):
                raise DLMScopeError(f"{str(path)!r}: weight {name} has shape {tuple(value.shape)}, "
                                    f"expected {tuple(target.shape)}")
            target.copy_(value.float())
        if threshold is not None:
            sae.get_buffer("threshold").fill_(threshold)
        if fields is not None:
            sae.load_saelens_fields(fields, str(path))
    for name, t in sae.state_dict().items():
        _check_finite(t, name, path)
    return sae.eval()


def _check_finite(t: torch.Tensor, name: str, path: Path | str) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        where = f" (first at index {tuple(int(i) for i in bad.nonzero()[0])})" if t.dim() else ""
        raise DLMScopeError(f"{str(path)!r}: tensor {name} has {int(bad.sum())} non-finite value(s){where}; "
                            "the file is damaged")


def _load_saelens(path: Path) -> SAE:
    cfg_path, w_path = path / "cfg.json", path / "sae_weights.safetensors"
    c, w = _read_json(cfg_path), _read_safetensors(w_path)
    expected = _dict(c.get("metadata"), "metadata", cfg_path).get(CHECKSUM_KEY)
    if expected is not None and hashlib.sha256(w_path.read_bytes()).hexdigest() != expected:
        raise DLMScopeError(f"SAE weights {str(w_path)!r} are corrupt (checksum mismatch with cfg.json)")
    return from_saelens_state(c, w, cfg_path, w_path)


def from_saelens_state(c: dict, w: dict[str, torch.Tensor], cfg_path: Path | str = "cfg",
                       w_path: Path | str = "weights") -> SAE:
    """Our SAE from SAELens' config dict and weights (a file's or a live `sae_lens` SAE's); the paths name them
    in errors."""
    meta = dict(_dict(c.get("metadata"), "metadata", cfg_path))
    meta.pop(CHECKSUM_KEY, None)
    saved = c.get("architecture", "topk")
    arch = meta.pop("dlmscope_architecture", None) or SAELENS_READERS.get(saved)
    if arch not in ARCHITECTURES or ARCHITECTURES[arch].saved_as != saved:
        raise DLMScopeError(f"{str(cfg_path)!r}: architecture {saved!r} is not supported "
                            f"({', '.join(SAELENS_READERS)})")
    cls = ARCHITECTURES[arch]
    W_enc, b_enc, W_dec, b_dec = (_get(w, n, w_path).float() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if c.get("normalize_activations", "none") not in ("none", None) or c.get("reshape_activations", "none") != "none":
        raise DLMScopeError(f"{str(cfg_path)!r}: normalize_activations / reshape_activations other than 'none' "
                            "are not supported")
    if bool(c.get("apply_b_dec_to_input", True)) != cls.applies_b_dec_to_input:
        # (x - b_dec) W_enc + b = x W_enc + (b - b_dec W_enc): move b_dec between the input and the bias
        b_enc = b_enc + (1 if cls.applies_b_dec_to_input else -1) * (b_dec @ W_enc)
    if c.get("rescale_acts_by_decoder_norm", False):  # fold |W_dec row| into the encoder
        norm = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norm, b_enc * norm, W_dec / norm[:, None]
    d_in, d_sae = (_int(_get(c, key, cfg_path), key, cfg_path) for key in ("d_in", "d_sae"))
    if c.get("d_out", d_in) != d_in:
        raise DLMScopeError(f"{str(cfg_path)!r}: d_out={c['d_out']!r} differs from d_in={d_in}; "
                            "only SAEs and transcoders with d_out = d_in are supported")
    k = c.get("k", meta.get("k"))
    k = cls.default_k(d_sae) if k is None else k
    if k is None:
        raise DLMScopeError(f"{str(cfg_path)!r} lacks 'k'")
    prefixes = tuple(meta.pop("prefix_sizes", ()) or ())
    for key in ("k", "sae_lens_version", "sae_lens_training_version"):
        meta.pop(key, None)
    cfg = SAEConfig(d_in, d_sae, _int(k, "k", cfg_path), arch, meta, prefixes)
    return _build(cfg, w_path, W_enc, b_enc, W_dec, b_dec, fields=w)


def _load_dictionary_learning(path: Path) -> SAE:
    """DLM-Scope's release: dictionary_learning's AutoEncoderTopK (or BatchTopKSAE) `ae.pt` + `config.json`."""
    w_path = path / "ae.pt"
    c = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    try:
        w = torch.load(w_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DLMScopeError(f"cannot read SAE weights {str(w_path)!r}: {_first_line(e)}") from None
    if not isinstance(w, dict):
        raise DLMScopeError(f"{str(w_path)!r} is not a state dict")
    trainer = _dict(c.get("trainer", c), "trainer", path / "config.json")
    W_enc = _matrix(w, "encoder.weight", w_path)  # (n_latents, d_in)
    k = _int(w["k"], "k", w_path) if "k" in w else _int(_get(trainer, "k", path / "config.json"), "k",
                                                         path / "config.json")
    batch = "BatchTopK" in str(trainer.get("dict_class", ""))
    layer = trainer.get("layer")  # DLM-Scope hooks the output of block `layer`: our resid_post
    meta = {"model_name": trainer.get("lm_name"),
            "hook_name": f"blocks.{layer}.hook_resid_post" if isinstance(layer, int) else None,
            "source_hookpoint": trainer.get("submodule_name"), "source_format": "dictionary_learning"}
    cfg = SAEConfig(W_enc.shape[1], W_enc.shape[0], k, "batchtopk" if batch else "topk", meta)
    threshold = float(w["threshold"]) if batch and "threshold" in w else None
    return _build(cfg, w_path, W_enc.t(), _get(w, "encoder.bias", w_path), _get(w, "decoder.weight", w_path).t(),
                  _get(w, "b_dec", w_path), threshold)


def _load_sparsify(path: Path) -> SAE:
    cfg_path, w_path = path / "cfg.json", path / "sae.safetensors"
    c, w = _read_json(cfg_path), _read_safetensors(w_path)
    if c.get("activation", "topk") != "topk" or c.get("transcode") or c.get("skip_connection") or "W_skip" in w:
        raise DLMScopeError(f"{str(cfg_path)!r}: only plain Top-K sparsify SAEs are supported (no groupmax, "
                            "transcoder or skip connection)")
    W_enc = _matrix(w, "encoder.weight", w_path)
    cfg = SAEConfig(W_enc.shape[1], W_enc.shape[0], _int(_get(c, "k", cfg_path), "k", cfg_path), "topk",
                    {"source_hookpoint": path.name, "source_format": "sparsify"})
    return _build(cfg, w_path, W_enc.t(), _get(w, "encoder.bias", w_path), _get(w, "W_dec", w_path),
                  _get(w, "b_dec", w_path))


def load_sae_dir(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder in SAELens/dlmscope, DLM-Scope (dictionary_learning Top-K) or sparsify format."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DLMScopeError(f"SAE folder {str(path)!r} does not exist")
    if (path / "sae_weights.safetensors").is_file():
        sae = _load_saelens(path)
    elif (path / "ae.pt").is_file():
        sae = _load_dictionary_learning(path)
    elif (path / "sae.safetensors").is_file():
        sae = _load_sparsify(path)
    else:
        inner = sorted(p.name for p in path.iterdir() if p.is_dir() and any(
            (p / f).is_file() for f in ("sae_weights.safetensors", "ae.pt", "sae.safetensors")))
        hint = f"; it holds several SAEs, pass one of: {', '.join(inner)}" if inner else ""
        raise DLMScopeError(f"{str(path)!r} holds no known SAE format (sae_weights.safetensors, ae.pt or "
                            f"sae.safetensors){hint}")
    return sae.to(device)
