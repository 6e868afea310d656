"""Run configurations composed from parts: every setting lives in exactly one part, and a config is the parts
it needs (`TrainSAEConfig` = model + site + data + dictionary + SAE + JumpReLU + optimiser + run; the
crosscoder's `DiffConfig` = checkpoints + site + data + dictionary + optimiser + run).

`Options.__post_init__` checks every field against its type hint (so a config file's `lr: fast` or
`progress: 'no'` is one line), then runs the `check()` of every part along the MRO, base parts first: a
config composed of parts runs all their checks, whichever subclass it is. A field's `choices(...)` metadata
names its allowed values (looked up when checked, so registries stay the one place that lists them);
the CLI shows them as choices. `renamed` maps old config-file keys to the fields that replaced them.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from . import checks
from .errors import DLMScopeError
from .models.zoo import DEFAULT_MODEL

SITES = ("pre", "mid", "post", "mlp_in", "mlp_out", "attn_out")
"""Hook sites an SAE can read (and a transcoder predict)."""


def choices(allowed: Callable[[], tuple[str, ...]], unset: str | None = None) -> dict:
    """Field metadata: the allowed values (a function, so a registry is read when checked); `unset` says what
    None means in --help."""
    return {"choices": allowed, **({"unset": unset} if unset else {})}


def unset(meaning: str) -> dict:
    """Field metadata for an optional setting: what leaving it unset (None) means, shown as its --help default."""
    return {"unset": meaning}


_HINTS: dict[type, dict[str, Any]] = {}


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved type hint of every field of `cls` (string annotations included, along the MRO), cached."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def split_optional(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) for `X | None` / `Optional[X]`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def allowed_values(f: Field, hint: Any) -> tuple[str, ...] | None:
    """A field's choices: from its `choices(...)` metadata or a Literal hint."""
    if "choices" in f.metadata:
        return tuple(f.metadata["choices"]())
    base, _ = split_optional(hint)
    return tuple(typing.get_args(base)) if typing.get_origin(base) is Literal else None


def check_value(f: Field, hint: Any, value: Any) -> Any:
    """`value` checked (and normalised) against the field's type hint; one-line `DLMScopeError` otherwise."""
    base, optional = split_optional(hint)
    if optional and (value is None or value == ""):  # "" is how older config files wrote "unset"
        return None
    allowed = allowed_values(f, hint)
    if allowed is not None:
        return checks.choice(f.name, value, allowed)
    if base is bool:
        if not isinstance(value, bool):
            raise DLMScopeError(f"{f.name}={value!r} must be true or false")
        return value
    if base is int:
        return checks.integer(f.name, value)
    if base is float:  # the type only: each part checks its ranges (nan and inf included)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else checks.number(f.name, value)
    if base is str:
        return checks.text(f.name, value)
    return value


@dataclass
class Options:
    """Base of every composed config (module docstring)."""

    renamed: ClassVar[dict[str, str]] = {}
    """Old config-file keys -> the fields that replaced them (read with a warning for one release)."""

    def __post_init__(self) -> None:
        hints = type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, check_value(f, hints[f.name], getattr(self, f.name)))
        for cls in reversed(type(self).__mro__):
            check = cls.__dict__.get("check")
            if check is not None:
                check(self)


def field_default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def load_config_file(path: str | Path, cls: type) -> dict:
    """Read a YAML or JSON config whose keys are fields of the dataclass `cls` (its values are checked by `cls`);
    renamed keys (`cls.renamed`) are read as their new names with a warning on stderr."""
    import sys

    import yaml

    path = Path(path)
    if not path.is_file():
        raise DLMScopeError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise DLMScopeError(f"config file {str(path)!r} is not valid YAML/JSON{at}") from None
    if not isinstance(data, dict):
        raise DLMScopeError(f"config file {str(path)!r} must hold a mapping of option: value, "
                            f"not a {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    for old, new in getattr(cls, "renamed", {}).items():
        if old in data and old not in known:
            print(f"warning: config key {old!r} is deprecated; it is now {new!r}", file=sys.stderr)
            data.setdefault(new, data.pop(old))
    unknown = sorted(str(key) for key in set(data) - known)
    if unknown:
        raise DLMScopeError(f"unknown config keys {unknown} in {str(path)!r}; allowed: {', '.join(sorted(known))}")
    return data


# ------------------------------------------------------------------------------------------------ the parts

@dataclass
class ModelPart(Options):
    model: str = DEFAULT_MODEL
    """Model: a built-in name or a checkpoint folder."""


@dataclass
class SitePart(Options):
    layers: str = "1,3"
    """Comma-separated layer indices (hook blocks.{i}.hook_resid_{site}, or blocks.{i}.hook_{site} for MLP sites)."""
    site: str = field(default="post", metadata=choices(lambda: SITES))
    """Site the dictionary reads: pre, mid or post (residual stream), mlp_in, mlp_out or attn_out (what attention
    adds)."""

    def check(self) -> None:
        self.layer_list()

    def layer_list(self) -> list[int]:
        return checks.int_list("layers", self.layers, 0)

    @staticmethod
    def hook(layer: int, site: str) -> str:
        return f"blocks.{layer}.hook_{site if site.startswith(('mlp', 'attn')) else 'resid_' + site}"


def policy_names() -> tuple[str, ...]:
    from .activations import POLICIES

    return POLICIES


@dataclass
class DataPart(Options):
    dataset: str = "builtin"
    """Text source: builtin, a .txt/.jsonl/.parquet file or a local datasets name."""
    column: str = "text"
    """Text column for jsonl/parquet/datasets sources."""
    activation_cache: str | None = None
    """Train from an activation cache folder written by `dlmscope cache` instead of running the model."""
    context_length: int = 128
    """Tokens per packed row."""
    seqs_per_forward: int = 32
    """Rows per model forward."""
    policy: str | None = field(default=None, metadata=choices(policy_names, "mask for DLMs, clean for causal models"))
    """Positions whose activations are used: mask, unmask, all or clean."""
    t_min: float = 0.05
    """Lowest mask ratio drawn per batch."""
    t_max: float = 0.5
    """Highest mask ratio drawn per batch."""
    buffer_tokens: int = 65536
    """Shuffle-buffer capacity in tokens."""
    prefetch: bool = True
    """Make activations in a background thread while training (same batches, same order as without)."""
    eval_tokens: int = 8192
    """Held-out activation vectors used for metrics."""

    def check(self) -> None:
        for name in ("context_length", "seqs_per_forward", "buffer_tokens", "eval_tokens"):
            checks.positive(name, getattr(self, name))
        checks.number("t_min", self.t_min, 0.0, 1.0)
        checks.number("t_max", self.t_max, self.t_min, 1.0)


@dataclass
class DictionaryPart(Options):
    k: str = "32"
    """Comma-separated k values (active latents per token); one dictionary per layer and k."""
    expansion: int = 8
    """Latents per input dimension (n_latents = expansion * d_model)."""

    def check(self) -> None:
        checks.positive("expansion", self.expansion)
        self.k_list()

    def k_list(self) -> list[int]:
        return checks.int_list("k", self.k, 1)


def architecture_names() -> tuple[str, ...]:
    from .sae.model import ARCHITECTURES

    return tuple(ARCHITECTURES)


@dataclass
class SAEPart(Options):
    architecture: str = field(default="topk", metadata=choices(architecture_names))
    """SAE architecture (transcoders also need --target-site)."""
    target_site: str | None = field(default=None, metadata=choices(lambda: SITES, "none (not a transcoder)"))
    """Transcoders: the site they predict in the same layer (e.g. --site mlp_in --target-site mlp_out)."""
    prefix_sizes: str | None = field(default=None, metadata=unset("n_latents/16, n_latents/4"))
    """Matryoshka: comma-separated nested prefix sizes (the full width is added)."""

    def check(self) -> None:
        from .sae.model import ARCHITECTURES

        transcoder = getattr(ARCHITECTURES.get(self.architecture), "transcodes", False)
        if transcoder != (self.target_site is not None) or self.target_site == getattr(self, "site", None):
            raise DLMScopeError(f"target_site={self.target_site!r} with site={getattr(self, 'site', None)!r}: "
                                "transcoders (and only they) need a target site other than the site they read")
        self.prefix_list()

    def prefix_list(self) -> tuple[int, ...]:
        return tuple(checks.int_list("prefix_sizes", self.prefix_sizes)) if self.prefix_sizes else ()


@dataclass
class RunPart(Options):
    total_tokens: int = 600_000
    """Training tokens per dictionary (the default finishes in about 4-5 minutes on a 2-core CPU)."""
    batch_size: int = 1024
    """Activation vectors per optimiser step."""
    eval_every: int = 50
    """Steps between held-out evaluations."""
    checkpoint_every: int = 100
    """Steps between checkpoints."""
    out: str = "runs"
    """Output folder holding the runs (each in OUT/NAME)."""
    name: str | None = field(default=None, metadata=unset("model, layers and k"))
    """Run name (a name, not a path)."""
    resume: bool = False
    """Continue the run's checkpoint (options that change the result must be the ones it was written with)."""
    device: str = "cpu"
    """Torch device (cuda for GPUs; torchrun sets one per process)."""
    sae_devices: str | None = field(default=None, metadata=unset("--device"))
    """Comma-separated devices the dictionaries are spread over round-robin (e.g. cuda:1,cuda:2)."""
    dtype: str = "float32"
    """Model dtype: float32, bfloat16 or float16."""
    threads: int = 0
    """CPU threads for torch (0 = torch's default; 1 is fastest on a machine busy with other work)."""
    seed: int = 0
    """Seed for data order, masks and initial weights."""
    progress: bool = True
    """Show a progress bar."""

    def check(self) -> None:
        from .models.checkpoint import resolve_dtype

        for name in ("total_tokens", "batch_size", "eval_every", "checkpoint_every"):
            checks.positive(name, getattr(self, name))
        if self.total_tokens < self.batch_size:
            raise DLMScopeError(f"total_tokens={self.total_tokens} must hold at least one batch of {self.batch_size}")
        checks.non_negative("threads", self.threads)
        checks.device("device", self.device)
        for d in self.sae_device_list(self.device):
            checks.device("sae_devices", d)
        resolve_dtype(self.dtype)

    def sae_device_list(self, default: str) -> list[str]:
        return [d.strip() for d in (self.sae_devices or "").split(",") if d.strip()] or [default]


def safe_name(text: str) -> str:
    """`text` as a run name: commas become `_`, anything but letters, digits, `_`, `.` and `-` too."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text.replace(",", "_"))
