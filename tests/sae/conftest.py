import pytest
import torch

from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig

META = {"model_name": "m", "hook_name": "blocks.0.hook_resid_post", "masking_policy": "mask", "t_range": [0.05, 0.5]}


def _make_trainer(arch: str = "topk", steps: int = 10, **train) -> SAETrainer:
    """A 16-d, 64-latent, k=4 SAE trained `steps` steps on shifted, scaled Gaussian data."""
    gen = torch.Generator().manual_seed(0)
    meta = {**META, "hook_name_out": "blocks.0.hook_mlp_out"} if arch.endswith("transcoder") else dict(META)
    tr = SAETrainer(SAEConfig(16, 64, 4, arch, meta),
                    TrainConfig(total_tokens=128 * max(steps, 10), batch_size=128, warmup_steps=2, **train))
    mix = torch.randn(16, 16, generator=torch.Generator().manual_seed(9))  # transcoders learn x -> relu(x M)
    for _ in range(steps):
        x = torch.randn(128, 16, generator=gen) * 5 + 2
        tr.step(x, target=(x @ mix).relu() if arch.endswith("transcoder") else None)
    return tr


@pytest.fixture
def make_trainer():
    return _make_trainer


@pytest.fixture
def raw_x():
    return torch.randn(40, 16, generator=torch.Generator().manual_seed(1)) * 5 + 2


@pytest.fixture
def trained():
    return _make_trainer()
