import torch

from dlmscope.sae import SAEConfig
from dlmscope.sae.jumprelu import JumpReLUSAE, jumprelu, step


def test_jumprelu_forward_and_straight_through_gradients_by_hand():
    z = torch.tensor([[0.30, 0.52, 0.10], [0.49, 0.70, -0.2]], requires_grad=True)
    theta = torch.tensor([0.50, 0.50, 0.12], requires_grad=True)
    eps = 0.05  # kernel window: |z - theta| < 0.025
    f = jumprelu(z, theta, eps)
    torch.testing.assert_close(f.detach(), torch.tensor([[0.0, 0.52, 0.0], [0.0, 0.70, 0.0]]))
    f.sum().backward()
    # d/dz = H(z - theta); d/dtheta = -(theta/eps) K((z - theta)/eps), summed over tokens
    torch.testing.assert_close(z.grad, torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    # latent 0: only z=0.49 is in the window (0.30 is not); latent 1: 0.52 in, 0.70 out; latent 2: 0.10 in
    torch.testing.assert_close(theta.grad, torch.tensor([-0.5 / eps, -0.5 / eps, -0.12 / eps]))


def test_step_has_no_input_gradient_and_a_kernel_threshold_gradient():
    z = torch.tensor([[0.30, 0.52], [0.49, 0.70]], requires_grad=True)
    theta = torch.tensor([0.50, 0.50], requires_grad=True)
    h = step(z, theta, 0.05)
    torch.testing.assert_close(h.detach(), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    (h * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    assert torch.count_nonzero(z.grad) == 0
    torch.testing.assert_close(theta.grad, torch.tensor([-3.0 / 0.05, -2.0 / 0.05]))


def test_threshold_gates_encode_and_training_reaches_the_target_l0(make_trainer, raw_x):
    sae = JumpReLUSAE(SAEConfig(16, 64, 4, "jumprelu", {"hook_name": "h"}))
    with torch.no_grad():
        sae.threshold.fill_(1e9)
        assert torch.count_nonzero(sae.encode(raw_x)) == 0
        sae.threshold.fill_(1e-6)
        pre = sae.pre_acts(raw_x)
        torch.testing.assert_close(sae.encode(raw_x), pre.relu())
    tr = make_trainer("jumprelu", steps=200)
    assert tr.sae.threshold.min() > 0 and tr.sae.threshold.std() > 0  # per-latent thresholds moved apart
    lat = tr.sae.encode(raw_x)
    assert 2 <= float((lat > 0).sum(-1).float().mean()) <= 8  # steered towards k = 4 from the calibrated start
    assert float(tr.sae.l0_coef) > 0


def test_l0_penalty_warms_up(make_trainer):
    tr = make_trainer("jumprelu", steps=3, l0_warmup=1.0, target_l0=0, l0_coef=0.5)
    x = torch.randn(128, 16) * 5 + 2
    logs = tr.step(x)
    assert abs(logs["l0_coef"] - 0.5 * 4 / tr.cfg.steps) < 1e-9  # step index 3 of 10, linear from 0
