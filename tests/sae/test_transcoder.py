import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig, load_sae_dir, save_sae

META = {"model_name": "m", "hook_name": "blocks.0.hook_mlp_in", "hook_name_out": "blocks.0.hook_mlp_out"}


def _train(arch: str, steps: int = 150):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(16, 16, generator=gen)
    tr = SAETrainer(SAEConfig(16, 64, 4, arch, dict(META)), TrainConfig(total_tokens=128 * steps, batch_size=128,
                                                                        warmup_steps=2))
    for _ in range(steps):
        x = torch.randn(128, 16, generator=gen) * 3 + 1
        logs = tr.step(x, target=(x @ A).relu() * 0.1 + x @ A.t() * 0.05)
    return tr, A, logs


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder"])
def test_transcoder_learns_the_map_and_round_trips(tmp_path, arch):
    tr, A, logs = _train(arch)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(3)) * 3 + 1
    y = (x @ A).relu() * 0.1 + x @ A.t() * 0.05
    ev = tr.evaluate(x, target=y)
    assert ev["fvu"] < 0.9 and ev["l0"] <= 4 * 2
    save_sae(tr.sae, tmp_path / "tc")
    back = load_sae_dir(tmp_path / "tc")
    assert back.cfg.architecture == arch and back.cfg.hook_name_out == "blocks.0.hook_mlp_out"
    torch.testing.assert_close(back.encode(x), tr.sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.reconstruct(x), tr.sae.reconstruct(x), atol=1e-4, rtol=1e-4)
    if arch == "skip_transcoder":
        assert back.W_skip.abs().sum() > 0


def test_skip_path_beats_no_skip_on_a_mostly_linear_map():
    assert _train("skip_transcoder")[2]["fvu"] < _train("transcoder")[2]["fvu"]


@pytest.mark.parametrize("out", [None, "blocks.0.hook_mlp_in"])
def test_transcoder_needs_a_different_output_hook(out):
    meta = {"hook_name": "blocks.0.hook_mlp_in", **({"hook_name_out": out} if out else {})}
    with pytest.raises(DLMScopeError, match="reads one hook and predicts another") as e:
        SAEConfig(16, 64, 4, "transcoder", meta)
    assert "\n" not in str(e.value)
