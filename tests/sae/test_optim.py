import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig
from dlmscope.sae.metrics import evaluate_sae
from dlmscope.sae.optim import SignScheduleFree, default_lr


def test_sign_schedule_free_update_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = SignScheduleFree([p], lr=0.1, beta=0.9)
    z, x = p.detach().clone(), p.detach().clone()
    weights = 0.0
    for lr, grad in ((0.1, [1.0, -3.0, 0.0]), (0.2, [-0.5, 2.0, 1.0])):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.tensor(grad)
        opt.step()
        weights += lr * lr
        z = z - lr * torch.tensor(grad).sign()
        x = x + (lr * lr / weights) * (z - x)
        torch.testing.assert_close(p.detach(), 0.9 * x + 0.1 * z)  # y: where the next gradient is taken
    with opt.averaged():
        torch.testing.assert_close(p.detach(), x)
    torch.testing.assert_close(p.detach(), 0.9 * x + 0.1 * z)


def test_signum_sf_trainer_schedule_averaged_eval_and_resume(tmp_path):
    from dlmscope.runstate import load_state, save_state

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(128, 16, generator=gen) * 5 + 2 for _ in range(12)]
    cfg = TrainConfig(total_tokens=128 * 12, batch_size=128, warmup_steps=2, optimizer="signum_sf", lr=0.01)
    a = SAETrainer(SAEConfig(16, 64, 4), cfg)
    assert default_lr("signum_sf", 64) == pytest.approx(2.5e-3 * 16)
    assert a.lr_at(11) == a.lr  # no decay: the average replaces it
    a.initialise(xs[0])
    first = a.evaluate(xs[0])["fvu"]  # the initialised, untrained SAE
    for x in xs[:6]:
        a.step(x)
    save_state(tmp_path, "t", a.state_dict())
    b = SAETrainer(SAEConfig(16, 64, 4), cfg)
    b.load_state_dict(load_state(tmp_path, "t"))
    assert [a.step(x) for x in xs[6:]] == [b.step(x) for x in xs[6:]]
    y = a.sae.W_enc.detach().clone()
    at_y = evaluate_sae(a.sae, xs[0])["fvu"]
    with a.averaged():
        assert not torch.equal(a.sae.W_enc, y)  # the average, not the training point
        averaged_fvu = a.evaluate(xs[0])["fvu"]  # evaluate swaps in the average itself, nested or not
        assert evaluate_sae(a.sae, xs[0])["fvu"] == averaged_fvu != at_y
    assert torch.equal(a.sae.W_enc, y) and a.evaluate(xs[0])["fvu"] == averaged_fvu < first
    with pytest.raises(DLMScopeError, match="optimizer='sgd'; allowed: adam, signum_sf"):
        TrainConfig(optimizer="sgd")


def _reference_sign_schedule_free(y, z, weight_sum, grad, lr, beta):
    """The docstring's updates as written: x recovered from y, z's sign step, the lr^2-weighted average, y."""
    x = (y - (1 - beta) * z) / beta
    weight_sum += lr * lr
    z = z - lr * grad.sign()
    x = x + (lr * lr / weight_sum) * (z - x)
    return beta * x + (1 - beta) * z, z, weight_sum


def test_sign_schedule_free_closed_form_matches_the_three_iterates():
    """The fused in-place step (one closed form on y) keeps the maths of the three-iterate updates, over a warm-up,
    zero gradients (latents that did not fire) and the trainer's edits to y between steps (unit decoder rows)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(64, 16, generator=gen), dim=1))
    b = torch.nn.Parameter(torch.zeros(16))
    opt = SignScheduleFree([w, b], lr=0.01)
    ref = {"w": (w.detach().double().clone(), w.detach().double().clone(), 0.0),
           "b": (b.detach().double().clone(), b.detach().double().clone(), 0.0)}
    for step in range(300):
        lr = 0.01 * min(1.0, (step + 1) / 50)
        opt.param_groups[0]["lr"] = lr
        for name, p in (("w", w), ("b", b)):
            g = torch.randn(p.shape, generator=gen)
            g[torch.rand(p.shape, generator=gen) < 0.5] = 0.0  # rows that got no gradient this step
            p.grad = g.clone()
            ref[name] = _reference_sign_schedule_free(*ref[name], g.double(), lr, 0.95)
        opt.step()
        assert torch.equal(b.grad, b.grad.sign())  # documented: the step leaves the gradient's sign in place
        with torch.no_grad():  # the trainer renormalises decoder rows after each step; both see the same edit
            norms = w.norm(dim=1, keepdim=True)
            w.div_(norms)
            y, z, s = ref["w"]
            ref["w"] = (y / norms.double(), z, s)
    for name, p in (("w", w), ("b", b)):
        y, z, s = ref[name]
        torch.testing.assert_close(p.detach().double(), y, atol=1e-6, rtol=0)
        torch.testing.assert_close(opt.state[p]["z"].double(), z, atol=1e-6, rtol=0)
        assert opt.state[p]["weight_sum"] == pytest.approx(s)
    with opt.averaged():
        torch.testing.assert_close(w.detach().double(), (ref["w"][0] - 0.05 * ref["w"][1]) / 0.95, atol=1e-6, rtol=0)
    assert set(opt.state_dict()["state"][0]) == {"z", "weight_sum"}
