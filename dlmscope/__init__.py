"""dlmscope: mechanistic interpretability for diffusion language models.

    import dlmscope
    lm = dlmscope.load_model("dlmscope-tiny-dlm")          # or a local LLaDA / Dream folder
    out = dlmscope.generate(lm, ["The list type"], gen_length=32, steps=32)
    acts = dlmscope.run_with_cache(lm, ids, ["blocks.1.hook_resid_post"])
"""

from .diffusion.sampler import DenoiseStep, GenerateOutput, Remasking, generate
from .errors import DLMScopeError
from .hooks import capture, hooked, run_with_cache
from .models import DEFAULT_MODEL, LoadedModel, load_model

__all__ = [
    "load_model", "LoadedModel", "DEFAULT_MODEL", "generate", "GenerateOutput", "DenoiseStep", "Remasking",
    "capture", "hooked", "run_with_cache", "DLMScopeError",
]
__version__ = "0.1.0"
