"""dlmscope: mechanistic interpretability for diffusion language models.

    import dlmscope
    lm = dlmscope.load_model("dlmscope-tiny-dlm")          # or a local LLaDA / Dream folder
    out = dlmscope.generate(lm, ["The list type"], gen_length=32, steps=32)
    acts = dlmscope.run_with_cache(lm, torch.tensor(lm.to_tokens(["The list type"])), ["blocks.1.hook_resid_post"])
    sae = dlmscope.load_sae("tiny-dlm-L1-k32")               # shipped SAE name or an SAE folder
    theirs = dlmscope.to_sae_lens(sae)                        # a sae_lens.SAE (and from_sae_lens back)
"""

from .diffusion.sampler import DenoiseStep, GenerateOutput, Remasking, generate
from .errors import DLMScopeError
from .hooks import capture, hooked, run_with_cache
from .models import DEFAULT_MODEL, LoadedModel, load_model
from .models.lens import to_hooked_transformer
from .sae import from_sae_lens, load_sae, to_sae_lens

__all__ = [
    "load_model", "load_sae", "to_sae_lens", "from_sae_lens", "LoadedModel", "DEFAULT_MODEL", "generate",
    "GenerateOutput", "DenoiseStep", "Remasking", "capture", "hooked", "run_with_cache", "DLMScopeError",
    "to_hooked_transformer",
]
__version__ = "0.1.0"
