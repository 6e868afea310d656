"""Checks around loading a checkpoint, each one line: what a folder must hold before any weights are read, and
what a loaded model must satisfy before anything runs on it. `load_model` calls them; commands call
`peek_family` to refuse a wrong family before loading anything.
"""

from __future__ import annotations

from pathlib import Path

from .. import checks
from ..errors import DLMScopeError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Weight files that are Python pickles: loading them can run code, so dlmscope never does."""


def check_weight_files(folder: Path) -> None:
    """A folder must hold safetensors weights; one with only pickled weights is refused by name (transformers would
    otherwise fail with an UnpicklingError traceback, or worse, unpickle)."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise DLMScopeError(f"{str(folder)!r} holds only pickled weights ({', '.join(pickled[:3])}); dlmscope never "
                            "unpickles checkpoints: convert them to safetensors (model.safetensors)")


def check_model_type(config: dict, family: str, folder: Path) -> None:
    """Families transformers builds (causal, masked_lm) need a model_type transformers knows."""
    if family not in ("causal", "masked_lm"):
        return
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise DLMScopeError(f"{str(folder / 'config.json')!r} has model_type={model_type!r}, which neither dlmscope "
                            "(llada, dream, lladamoe, llada2_moe) nor transformers knows")


def check_loaded(lm) -> None:
    """A loaded model's mask id lies inside its vocabulary and every weight is finite (a NaN weight would
    otherwise generate empty text with exit code 0)."""
    if lm.mask_id is not None and not 0 <= lm.mask_id < lm.vocab_size:
        raise DLMScopeError(f"model {lm.name!r}: mask_token_id={lm.mask_id} lies outside its vocabulary of "
                            f"{lm.vocab_size} tokens (ids 0..{lm.vocab_size - 1})")
    def placed(items):  # offloaded weights (device_map) sit on the meta device: they are checked where they live
        return {n: t for n, t in items if t.device.type != "meta"}

    checks.finite_tensors(f"model {lm.name!r} is unusable", placed(lm.module.named_parameters()))
    nan = [n for n, t in placed(lm.module.named_buffers()).items() if t.is_floating_point() and bool(t.isnan().any())]
    if nan:  # buffers may hold -inf on purpose (attention masks), never NaN
        raise DLMScopeError(f"model {lm.name!r} is unusable: buffer {nan[0]} holds NaN")


def peek_family(name: str) -> str:
    """The family of a built-in name or checkpoint folder from its config.json alone (nothing loaded)."""
    from . import detect_family
    from .checkpoint import read_config
    from .zoo import BUILTIN, builtin_path

    folder = builtin_path(name) if name in BUILTIN else Path(name).expanduser()
    if not folder.is_dir():
        raise DLMScopeError(f"model {name!r} is neither a checkpoint folder nor a built-in model "
                            f"({', '.join(BUILTIN)})")
    return detect_family(read_config(folder))
