"""Activation providers for SAE training (DLM-Scope's protocol), one module per concern.

- `source`: `ActivationSource` (one forward per batch of packed text; masking policy, positions, many
  hooks per forward), `PairedActivationSource` (several checkpoints on identical batches), `ActivationBatch`;
- `buffer`: `ShuffleBuffer`; `prefetch`: `Prefetcher` (batches made ahead in a thread);
- `trajectory`: `trajectory_activations` (per sampler step);
- `cache`: `write_cache`, `CachedSource`, `read_manifest`, `mmap_safetensors` (shards on disk).

Every name stays importable from `dlmscope.activations`.
"""

from .buffer import ShuffleBuffer
from .cache import MANIFEST_EVERY_S, CachedSource, mmap_safetensors, read_manifest, write_cache
from .prefetch import Prefetcher
from .source import INFO_KEYS, POLICIES, ActivationBatch, ActivationSource, PairedActivationSource, default_policy
from .trajectory import TRAJECTORY_POSITIONS, trajectory_activations

__all__ = ["POLICIES", "INFO_KEYS", "ActivationBatch", "default_policy", "ActivationSource",
           "PairedActivationSource", "ShuffleBuffer", "Prefetcher", "TRAJECTORY_POSITIONS", "trajectory_activations",
           "mmap_safetensors", "read_manifest", "write_cache", "MANIFEST_EVERY_S", "CachedSource"]
