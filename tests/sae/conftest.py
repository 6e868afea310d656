import pytest
import torch

from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig

META = {"model_name": "m", "hook_name": "blocks.0.hook_resid_post", "masking_policy": "mask", "t_range": [0.05, 0.5]}


def _make_trainer(arch: str = "topk", steps: int = 10, **train) -> SAETrainer:
    """A 16-d, 64-latent, k=4 SAE trained `steps` steps on shifted, scaled Gaussian data."""
    gen = torch.Generator().manual_seed(0)
    tr = SAETrainer(SAEConfig(16, 64, 4, arch, dict(META)),
                    TrainConfig(total_tokens=128 * max(steps, 10), batch_size=128, warmup_steps=2, **train))
    for _ in range(steps):
        tr.step(torch.randn(128, 16, generator=gen) * 5 + 2)
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
