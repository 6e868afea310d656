"""The built-in tiny models shipped inside the package, loadable by name with no download."""

from __future__ import annotations

from pathlib import Path

from ..errors import DLMScopeError

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
BUILTIN = {
    "dlmscope-tiny-dlm": "LLaDA-architecture masked diffusion LM trained on Python docs + Sudoku/Countdown",
    "dlmscope-tiny-ar": "its autoregressive twin: same size, data and tokens, causal attention",
}
DEFAULT_MODEL = "dlmscope-tiny-dlm"
DEFAULT_AR_MODEL = "dlmscope-tiny-ar"


def builtin_path(name: str) -> Path:
    if name not in BUILTIN:
        raise DLMScopeError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN)}")
    path = ZOO_DIR / name
    if not (path / "config.json").is_file():
        raise DLMScopeError(f"built-in model {name!r} is missing from {str(path)!r}; rebuild it with experiments/train_zoo.py")
    return path
